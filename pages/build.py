"""Step 4: preview the augmentation, build a model in a background worker, then read its results."""

from pathlib import Path

import streamlit as st

from nanostream import jobs, ui
from nanostream.store.db import FINISHED, StoreError

ui.run_through_app()
store = ui.open_store()
project = ui.require_project()
jobs.reap(store)
st.header("Build")
counts = store.counts(project)
st.caption(f"{' · '.join(f'**{name}**: {n} photos' for name, n in counts.items())}. **Build model** teaches a "
           f"pretrained network your categories, in the background ({jobs.build_time_hint(store, sum(counts.values()))}). "
           "It also learns from changed copies of each photo, as previewed below.")
message = st.empty()
for warning in ui.data_warnings(counts):
    st.warning(warning)
job = jobs.latest_job(store, project, "build")


def start(config) -> None:
    try:
        jobs.start_build(store, project, config)
    except (jobs.JobError, StoreError) as exc:
        message.error(str(exc))
    else:
        st.rerun()


def options_ui() -> None:
    """Augmentation policy with its preview, advanced options folded away, and the Build button."""
    choices = ui.build_choices()
    policies, fills = choices["policies"], list(choices["fill_modes"])
    left, right = st.columns([1, 1])
    policy = left.selectbox("Augmentation: the extra copies made of each photo", list(policies), key="build_policy",
                            format_func=lambda n: f"{n}: {policies[n]}")
    fill = right.selectbox("Fill: what shows at the edges after a rotation or shift", fills,
                           index=fills.index(choices["fills"][policy]), key=f"build_fill_{policy}")
    sample = [str(store.image_path(images[0])) for name in counts
              if (images := store.list_images(project, name))][:3]
    if sample:
        st.caption("Preview: each photo as the model sees it, then four augmented copies.")
        with st.spinner("Drawing the preview…"):
            rows = ui.augmentation_preview(tuple(sample), policy, fill)
        for row in rows:
            st.image(row, width=120, caption=["original"] + [f"copy {i}" for i in range(1, len(row))])
    with st.expander("Advanced options"):
        backbones = choices["backbones"]
        backbone = st.selectbox("Backbone (the pretrained network that reads the photos)", ["auto", *backbones],
                                key="build_backbone", format_func=lambda n: "auto: try each, keep the best" if n == "auto"
                                else f"{n} ({backbones[n]:g} GFLOPs per photo)")
        mode = st.radio("Mode", choices["modes"], horizontal=True, key="build_mode",
                        help="fast: train only the last layer (seconds to minutes). finetune: also adjust the "
                             "backbone's last stages (slower; can help with unusual photos). auto: fine-tune and "
                             "keep it only if it scores better.")
        views = st.number_input("Augmented copies per photo", 0, 16, choices["views"][policy], key=f"build_views_{policy}")
    if st.button("Build model", type="primary", key="build_go", icon=":material/model_training:"):
        from nanostream.engine.train import TrainConfig

        start(TrainConfig(backbone=backbone, augment=policy, fill=fill, views=int(views), mode=mode))


def fixes_ui(result: dict) -> None:
    """The held-out photos the model got wrong (or nearly), each with a one-click fix."""
    wrong = [e for e in result["metrics"].get("highest_loss", [])
             if e["predicted"] != e["label"] or e["confidence"] < ui.NOT_SURE]
    st.subheader("Photos it got wrong")
    if not wrong:
        st.caption("Every held-out photo was classified correctly and confidently.")
    for entry in wrong:
        try:
            record = store.get_image(project, entry["image_id"])
        except (StoreError, TypeError):
            continue  # deleted since the build
        if record.category != entry["label"]:
            continue  # already moved
        picture, text, actions = st.columns([1, 3, 2], vertical_alignment="center")
        picture.image(ui.thumbnail(str(store.image_path(record))), width=110)
        text.markdown(f"Labelled **{entry['label']}**; the model says **{entry['predicted']}** "
                      f"({entry['confidence']:.0%}).")
        if entry["predicted"] != entry["label"] and actions.button(
                f"Move to {entry['predicted']}", key=f"build_move_{record.id}"):
            store.move_images(project, [record.id], entry["predicted"])
            st.session_state["build_fixed"] = True
            st.rerun()
        if actions.button("Delete", key=f"build_delete_{record.id}"):
            store.delete_images(project, [record.id])
            st.session_state["build_fixed"] = True
            st.rerun()
    if st.session_state.get("build_fixed"):
        if st.button("Rebuild with the fixes", type="primary", key="build_rebuild"):
            from nanostream.engine.train import TrainConfig

            st.session_state["build_fixed"] = False
            start(TrainConfig(**job.params["config"]))


def results_ui(result: dict) -> None:
    metrics = result["metrics"]
    st.subheader(f"Model {result['model_id']}")
    accuracy, device = st.columns(2)
    accuracy.metric(f"Accuracy on {result['n_val']} held-out photos", f"{result['accuracy']:.0%}",
                    help="Photos kept aside while training, then classified: a fair estimate for new photos.")
    device.metric("Built on", "GPU" if result["gpu"] else "CPU", help=f"{result['device']}, {result['precision']} "
                  "arithmetic" + ("" if result["gpu"] else "; no GPU was found on this machine"))
    st.caption(f"Backbone **{result['backbone']}** · mode **{result['mode']}** · augmentation "
               f"**{result['policy']['name']}** ({result['policy']['views']} copies per photo, fill "
               f"{result['policy']['fill']}) · {result['n_train']} training photos · {result['seconds']:.0f} s")
    if result.get("advice"):
        with st.expander("Would more photos help?"):
            st.markdown(f"Measured on subsets of your photos: {result['advice']}")
            if result.get("curve_png") and Path(result["curve_png"]).is_file():
                st.image(result["curve_png"], width=520)
    table, matrix = st.columns([1, 1])
    table.markdown("**Per category** (on the held-out photos)")
    table.dataframe([{"category": label, "precision": f"{c['precision']:.0%}", "recall": f"{c['recall']:.0%}",
                      "photos": c["n"]} for label, c in metrics["per_class"].items()], hide_index=True)
    matrix.image(ui.confusion_png(metrics["confusion"], result["labels"]), width=360)
    fixes_ui(result)
    st.subheader("Backbones tried")
    st.dataframe([{"backbone": c["backbone"] + ("  ✓ chosen" if c["backbone"] == result["backbone"] else ""),
                   "score (cross-validated)": "—" if c["cv_accuracy"] is None else f"{c['cv_accuracy']:.0%}",
                   "time (s)": round(c["seconds"], 1), "GFLOPs per photo": c["gflops"], "note": c["error"] or ""}
                  for c in result["candidates"]], hide_index=True)
    if result["skipped"]:
        with st.expander(f"{len(result['skipped'])} photo(s) could not be read"):
            for file, reason in result["skipped"]:
                st.caption(f"{Path(file).name}: {reason}")
    st.page_link("pages/test.py", label="Next: test the model", icon=":material/arrow_forward:")


if job is not None and job.status not in FINISHED:
    st.subheader("Building…")
    st.caption("The build runs in the background: you may leave this page, refresh it or open another tab.")
    ui.job_progress_ui(job.id)
    st.stop()
if job is not None and job.status == "failed":
    st.error(f"The last build failed: {job.error.rstrip('.')}.  \nThe project and its images are unchanged: "
             f"fix what the message says, then build again.")
elif job is not None and job.status == "cancelled":
    st.info("The last build was cancelled. The project is unchanged.")
elif job is not None:
    results_ui(job.result)
    st.divider()
    st.subheader("Build again")
options_ui()

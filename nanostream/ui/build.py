"""The Build page's widgets: the options with the Build button first, the augmentation preview
after it (one labelled row per category), and a finished build's results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import streamlit as st

from .. import charts
from ..flows.build import BuildSummary, accuracy_in_words, backbone_in_words, candidate_table, class_table

PREVIEW_WIDTH = 110  # px a picture: the original and four copies fit beside the row's label at 1280 px
PREVIEW_COPIES = 4  # shown at most: the copies a build makes are views 1, 2, ... of each photo (preview.py)


@st.cache_data(ttl=300, show_spinner="Loading the build options…")
def build_choices() -> dict:
    """What the Build page offers: augmentation policies (in words), fill modes, backbones, modes."""
    from ..engine.augment import FILL_MODES, POLICIES
    from ..engine.backbones import available_backbones, get_spec
    from ..engine.preview import describe_policy
    from ..engine.train import MODES

    return {
        "policies": {name: describe_policy(policy) for name, policy in POLICIES.items()},
        "fills": {name: policy.fill for name, policy in POLICIES.items()},
        "views": {name: policy.views for name, policy in POLICIES.items()},
        "fill_modes": FILL_MODES,
        "backbones": {name: get_spec(name).gflops for name in available_backbones()},
        "modes": MODES,
    }


@st.cache_data(max_entries=32, show_spinner=False)
def augmentation_preview(image_paths: Sequence[str], policy_name: str, fill: str | None,
                         views: int, backbone: str = "efficientnet_lite0") -> list[list]:
    """engine.preview.augmented_views, cached: torch loads only when a preview is drawn."""
    from ..engine.preview import augmented_views

    return augmented_views(image_paths, policy_name, fill, views, backbone)


def build_options_ui(preview: Sequence[tuple[str, str]], preview_open: bool = True) -> dict | None:
    """Augmentation policy, advanced options folded away, the Build button, then the preview of
    the policy on the `preview` photos ((category, path) each; folded when preview_open is False):
    a TrainConfig's fields when Build is pressed, else None."""
    choices = build_choices()
    policies, fills = choices["policies"], list(choices["fill_modes"])
    left, right = st.columns([1, 1])
    policy = left.selectbox("Augmentation: the extra copies made of each photo", list(policies), key="build_policy",
                            format_func=lambda n: f"{n}: {policies[n]}")
    fill = right.selectbox("Fill: what shows at the edges after a rotation or shift", fills,
                           index=fills.index(choices["fills"][policy]), key=f"build_fill_{policy}")
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
    go = st.button("Build model", type="primary", key="build_go", icon=":material/model_training:")
    if preview:
        shown = min(int(views), PREVIEW_COPIES)
        title = "Preview: each photo as the model sees it"
        if not views:
            title += " (no augmented copies: Advanced options)"
        elif shown == views:
            title += f", then the {shown} augmented copies the build makes of it"
        else:
            title += f", then the first {shown} of the {int(views)} augmented copies the build makes of it"
        with st.expander(title, expanded=preview_open):
            preview_rows_ui(preview, policy, fill, shown)
    return dict(backbone=backbone, augment=policy, fill=fill, views=int(views), mode=mode) if go else None


def preview_rows_ui(preview: Sequence[tuple[str, str]], policy: str, fill: str, views: int) -> None:
    with st.spinner("Drawing the preview…"):
        rows = augmentation_preview(tuple(path for _, path in preview), policy, fill, views)
    for (category, _), row in zip(preview, rows):
        label, pictures = st.columns([1, 6], vertical_alignment="center")
        label.markdown(f"**{category}**")
        pictures.image(row, width=PREVIEW_WIDTH, caption=["original"] + [f"copy {i}" for i in range(1, len(row))])


def summary_ui(summary: BuildSummary) -> None:
    """A finished build at a glance: its headline, accuracy, device, how it was made, the advice."""
    st.subheader(f"Model {summary.model_id}")
    st.markdown(f"Accuracy **{accuracy_in_words(summary)}**.")
    measured = summary.n_train if summary.estimate == "cross-validation" else summary.n_val
    accuracy, device = st.columns(2)
    accuracy.metric(f"Accuracy on {measured} photos it had not seen", f"{summary.accuracy:.0%}",
                    help="Each photo classified by a model trained without it: a fair estimate for new photos. "
                         "The range in the sentence above is its 95% interval (Wilson): with few photos the true "
                         "accuracy could be anywhere in it.")
    device.metric("Built on", "GPU" if summary.gpu else "CPU", help=f"{summary.device}, {summary.precision} "
                  "arithmetic" + ("" if summary.gpu else "; no GPU was found on this machine"))
    st.caption(f"Backbone **{backbone_in_words(summary.backbone)}** · mode **{summary.mode}** · "
               f"augmentation **{summary.augment}** "
               f"({summary.views} copies per photo, fill {summary.fill}) · {summary.n_train} training photos · "
               f"{summary.seconds:.0f} s")
    if summary.advice:
        with st.expander("Would more photos help?"):
            st.markdown(f"Measured on subsets of your photos: {summary.advice}")
            if summary.curve_png and Path(summary.curve_png).is_file():
                st.image(summary.curve_png, width=520)
    table, matrix = st.columns([1, 1])
    table.markdown(f"**Per category** (on the {measured} photos it had not seen)")
    table.dataframe(class_table(summary), hide_index=True)
    matrix.image(charts.confusion_png(summary.confusion, summary.classes), width=360)


def details_ui(summary: BuildSummary) -> None:
    """The backbones tried, and the photos that could not be read."""
    st.subheader("Backbones tried")
    st.dataframe(candidate_table(summary), hide_index=True)
    if summary.skipped:
        with st.expander(f"{len(summary.skipped)} photo(s) could not be read"):
            for s in summary.skipped:
                st.caption(f"{Path(s.file).name}: {s.reason}")

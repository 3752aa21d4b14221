"""Step 5: try a model on new photos (uploaded, from URLs or the camera); a labelled zip or folder
measures its accuracy. Answers are kept: moving the 'not sure' slider only redraws them."""

import streamlit as st

from nanostream import ui
from nanostream.engine.bundle import BundleError, read_header
from nanostream.flows import evaluate

IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
MAX_URLS = 20  # fetched while the page waits: a handful, not a batch job

ui.run_through_app()
store = ui.open_store()
project = ui.require_project()
st.header("Test")
models = ui.require_models(store, project)

by_id = {m.model_id: m for m in models}
left, right = st.columns([2, 1])
model_id = left.selectbox("Model version", list(by_id), key="test_model", format_func=lambda i: (
    f"{i} · {by_id[i].metrics.get('accuracy', 0):.0%} held-out accuracy · built {ui.when(by_id[i].created_at)}"))
threshold = right.slider("'Not sure' below", 0.0, 1.0, ui.NOT_SURE, 0.05, key="test_threshold",
                         help="When the top probability is under this, the answer is shown as 'not sure'.")
bundle = by_id[model_id].bundle_path
try:  # the header is enough for the page: the network loads with the first photo (seconds, and torch)
    labels = read_header(bundle).meta["labels"]
except BundleError as exc:  # a damaged or missing file
    st.error(f"Cannot load model {model_id}: {exc}")
    st.stop()
st.caption(f"Categories: {', '.join(labels)}")


def unloadable(exc: Exception) -> None:
    """Damaged past its header, or its backbone is unavailable (BackboneUnavailable): said, and the page stops."""
    st.error(f"Cannot load model {model_id}: {exc}")
    st.stop()


def answers_ui(payloads: list[bytes], names: list[str]) -> None:
    """Each photo with the model's answer: classified once (ui.predictions), redrawn at each threshold."""
    try:
        answers = ui.predictions(bundle, tuple(payloads), tuple(names))
    except (ValueError, OSError, RuntimeError) as exc:
        unloadable(exc)
    for prediction, data in zip(answers, payloads):
        ui.prediction_ui(prediction, data, threshold)


photos_tab, camera_tab, urls_tab, measure_tab = st.tabs(["Upload photos", "Camera", "Paste URLs", "Measure accuracy"])
with photos_tab:
    files = st.file_uploader("Photos to classify", type=IMAGE_TYPES, accept_multiple_files=True, key="test_files")
    if files:
        answers_ui([f.getvalue() for f in files], [f.name for f in files])
with camera_tab:
    shot = ui.camera_ui("test_camera")
    if shot is not None:
        answers_ui([shot.getvalue()], ["camera photo"])
with urls_tab:
    text = st.text_area(f"Image URLs, one per line (up to {MAX_URLS})", key="test_urls")
    if st.button("Classify", key="test_urls_go") and text.strip():
        from nanostream.sources.download import fetch_images
        from nanostream.sources.ingest import parse_url_list

        urls, bad = parse_url_list(text)
        with st.spinner(f"Downloading {len(urls[:MAX_URLS])} image(s)…"):
            report = fetch_images(urls[:MAX_URLS])
        problems = [f"Line {line} is not an http(s) URL: {content[:80]}" for line, content in bad]
        st.session_state["test_fetched"] = (report.fetched, problems + [f"{f.url}: {f.reason}" for f in report.failed])
    fetched, problems = st.session_state.get("test_fetched", ((), ()))  # kept for the slider's reruns
    for problem in problems:
        st.error(problem)
    answers_ui([f.data for f in fetched], [f.url for f in fetched])
with measure_tab:
    st.caption("Upload a .zip (or a folder) with one subfolder per category, named like the model's categories, "
               "holding photos the model has not seen.")
    archives = st.file_uploader("Labelled .zip", type=["zip"], accept_multiple_files=True, key="test_zip")
    folder = st.file_uploader("…or a labelled folder", type=IMAGE_TYPES, accept_multiple_files="directory",
                              key="test_folder")
    if archives or folder:
        photos, skipped = evaluate.uploaded_photos([(f.name, f.getvalue()) for f in [*archives, *folder]])
        with st.spinner(f"Classifying {len(photos)} photo(s)…"):
            try:
                classifier = ui.load_model(bundle)
            except (ValueError, OSError, RuntimeError) as exc:
                unloadable(exc)
            evaluation = evaluate.evaluate(classifier, photos, skipped)
        if evaluation.n:
            st.metric(f"Accuracy on {evaluation.n} photos", f"{evaluation.accuracy:.0%}")
            st.dataframe([{"category": c.label, "correct": c.correct, "photos": c.n,
                           "accuracy": f"{c.recall:.0%}" if c.n else "—"} for c in evaluation.per_class],
                         hide_index=True)
            if evaluation.mistakes:
                st.subheader(f"Photos it got wrong ({len(evaluation.mistakes)})")
            for mistake in evaluation.mistakes[:30]:
                st.caption(f"{mistake.file}: is {mistake.label}, predicted {mistake.predicted} "
                           f"({mistake.confidence:.0%})")
            if unsure := evaluation.unsure(threshold):
                st.subheader(f"Right, but not sure ({len(unsure)})")
            for answer in unsure[:30]:
                st.caption(f"{answer.file}: {answer.label}, right with {answer.confidence:.0%}")
        else:
            st.error(evaluation.problem)
        if evaluation.skipped:
            with st.expander(f"{len(evaluation.skipped)} file(s) skipped"):
                for skip in evaluation.skipped[:100]:
                    st.caption(f"{skip.file}: {skip.reason}")

st.page_link("pages/share.py", label="Next: share the model", icon=":material/arrow_forward:")

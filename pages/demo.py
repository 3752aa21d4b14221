"""The public demo of one published model (/demo?model=<model_id>): its name, its classes, an upload, the answer.
Nothing here reads or changes a project."""

import streamlit as st

from nanostream import ui
from nanostream.store.records import StoreError

IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]

ui.run_through_app()
# app.py hides the navigation for demo links; this hides the sidebar's toggle too.
st.markdown("<style>[data-testid='stSidebar'], [data-testid='stSidebarCollapsedControl'],"
            " [data-testid='stExpandSidebarButton'] {display: none;}</style>", unsafe_allow_html=True)
model_id = st.query_params.get("model", "")
try:
    record = ui.open_store().get_model(model_id) if model_id else None
except StoreError:
    record = None
if record is None or not record.published:
    st.title("NanoStream demo")
    st.error("This model is not published, or the link is incomplete. "
             "Ask the person who shared it to publish the model and send the link again.")
    st.stop()
try:
    classifier = ui.load_model(record.bundle_path)
except (ValueError, OSError, RuntimeError) as exc:
    st.error(f"This model cannot be loaded right now: {exc}")
    st.stop()

st.title(classifier.meta.get("name") or record.project or model_id)
st.markdown("Tells apart: " + ", ".join(f"**{label}**" for label in classifier.labels))
photo = st.file_uploader("Upload a photo", type=IMAGE_TYPES, key="demo_photo")
if photo is not None:
    prediction = classifier.predict_bytes([photo.getvalue()], [photo.name])[0]
    ui.prediction_ui(prediction, photo.getvalue(), ui.NOT_SURE)
st.caption("Made with NanoStream")

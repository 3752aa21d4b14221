"""The public demo: /demo?project=<name> serves the project's published version, /demo?model=<id>
that version while it is published. Its name, its classes, a photo, the answer; each visitor's
photos are rate-limited (access.demo_budget). Nothing here reads or changes a project."""

import streamlit as st

from nanostream import ui
from nanostream.engine.bundle import BundleError, read_header
from nanostream.flows import publish
from nanostream.ui import demo as demo_ui
from nanostream.ui import share as share_ui

IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
UNLOADABLE = "This model cannot be loaded right now. Ask the person who shared it to build and publish it again."

ui.run_through_app()
# app.py hides the navigation for demo links; this hides the sidebar's toggle too.
st.markdown("<style>[data-testid='stSidebar'], [data-testid='stSidebarCollapsedControl'],"
            " [data-testid='stExpandSidebarButton'] {display: none;}</style>", unsafe_allow_html=True)
target = publish.demo_target(ui.open_store(), st.query_params.get("model"), st.query_params.get("project"))
if target.record is None:
    st.title("NanoStream demo")
    st.error(target.problem)
    if target.project_path:
        st.markdown(f"The current version is always at [this project's demo link]({target.project_path}).")
        st.link_button("Open the current version", target.project_path, icon=":material/open_in_new:")
    st.stop()
record = target.record
try:  # the header is enough to show the page: the network loads with the first photo (seconds, and torch)
    meta = read_header(record.bundle_path).meta
except BundleError:
    st.error(UNLOADABLE)
    st.stop()

st.title(meta.get("name") or record.project or record.model_id)
st.markdown("Tells apart: " + ", ".join(f"**{label}**" for label in meta["labels"]))
photo = st.file_uploader("Upload a photo", type=IMAGE_TYPES, key="demo_photo") or ui.camera_ui("demo_camera")
refusal = None if photo is None else demo_ui.demo_refusal(photo)
if refusal:
    st.warning(refusal)
elif photo is not None:
    try:
        prediction = ui.predictions(record.bundle_path, (photo.getvalue(),), (photo.name,))[0]
    except (ValueError, OSError, RuntimeError):  # damaged past its header, or its backbone is unavailable
        st.error(UNLOADABLE)
        st.stop()
    ui.prediction_ui(prediction, photo.getvalue(), ui.NOT_SURE)
share_ui.credits_ui(record.bundle_path)  # what its photos allow, and whom they credit
st.caption("Made with NanoStream")

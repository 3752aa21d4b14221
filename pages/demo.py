"""The public demo: /demo?project=<name> serves the project's published version, /demo?model=<id>
that version while it is published. Its name, its classes, a photo, the answer; each visitor's
photos are rate-limited (access.demo_budget). Nothing here reads or changes a project."""

import hashlib
import math

import streamlit as st

from nanostream import access, ui
from nanostream.flows import publish
from nanostream.ui import share as share_ui

IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]


@st.cache_resource
def demo_limiter(budget: access.Budget) -> access.RateLimiter:
    """One bucket per visitor address, shared by every session of this app process."""
    return access.RateLimiter(budget.per_minute, budget.burst)


def admitted(photo) -> bool:
    """Spend one of this visitor's tokens on a photo other than the last one classified (a rerun of
    the page, or the same bytes again, reuses ui.predictions' answer); with none left, say when to try again."""
    digest = hashlib.sha256(photo.getvalue()).hexdigest()
    if st.session_state.get("demo_charged") == digest:
        return True
    budget = access.demo_budget()
    visitor = access.visitor_from(st.user, st.context.ip_address, st.context.headers)
    wait = demo_limiter(budget).wait(access.client_of(visitor.ip_address or "127.0.0.1"))  # None: this computer
    if wait:
        st.warning(f"Too many photos in a short time: this demo classifies {budget.burst} at once and "
                   f"{budget.per_minute:g} a minute for each visitor. Try again in {math.ceil(wait)} s.")
        return False
    st.session_state["demo_charged"] = digest
    return True


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
try:
    classifier = ui.load_model(record.bundle_path)
except (ValueError, OSError, RuntimeError):
    st.error("This model cannot be loaded right now. Ask the person who shared it to build and publish it again.")
    st.stop()

st.title(classifier.meta.get("name") or record.project or record.model_id)
st.markdown("Tells apart: " + ", ".join(f"**{label}**" for label in classifier.labels))
photo = st.file_uploader("Upload a photo", type=IMAGE_TYPES, key="demo_photo") or ui.camera_ui("demo_camera")
if photo is not None and admitted(photo):
    prediction = ui.predictions(record.bundle_path, (photo.getvalue(),), (photo.name,))[0]
    ui.prediction_ui(prediction, photo.getvalue(), ui.NOT_SURE)
share_ui.credits_ui(record.bundle_path)  # what its photos allow, and whom they credit
st.caption("Made with NanoStream")

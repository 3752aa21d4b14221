"""NanoStream: a few category names and a few photos -> an image classifier, in the browser.

Run `streamlit run app.py`. This file holds the navigation and the shared sidebar only; each
step is a page in pages/. Who may edit is nanostream.access.decide's answer: with Streamlit's
[auth] section in .streamlit/secrets.toml, signed-in editors (NANOSTREAM_EDITORS); without it,
this computer only. Everyone else gets the demo pages and a page that says why (and offers
sign-in). NANOSTREAM_DEMO_ONLY=1 serves the demo page alone, to everyone.
"""

import os

import streamlit as st

from nanostream import access, jobs, process, ui
from nanostream.flows.sample import ensure_sample_project

st.set_page_config(page_title="NanoStream", page_icon=":material/neurology:", layout="wide")

DEMO = st.Page("pages/demo.py", title="Demo", icon=":material/play_circle:", url_path="demo", visibility="hidden")
WELCOME = st.Page("pages/welcome.py", title="NanoStream", icon=":material/login:", url_path="welcome", default=True)
STEPS = [
    st.Page("pages/projects.py", title="Projects", icon=":material/folder_open:", url_path="projects", default=True),
    st.Page("pages/categories.py", title="Categories", icon=":material/label:", url_path="categories"),
    st.Page("pages/images.py", title="Images", icon=":material/photo_library:", url_path="images"),
    st.Page("pages/build.py", title="Build", icon=":material/model_training:", url_path="build"),
    st.Page("pages/test.py", title="Test", icon=":material/science:", url_path="test"),
    st.Page("pages/share.py", title="Share", icon=":material/share:", url_path="share"),
]


@st.cache_resource
def _app_ready(root: str) -> bool:
    """Once per app process and store: the sample project on first launch, and the warm worker
    that forks each job's worker already imported (it saves each job 3-10 s of imports and loading)."""
    process.skip_collection_at_exit()  # a page that loaded a model imported torch: a stop takes ~1.4 s less
    store = ui.open_store()
    ensure_sample_project(store)
    jobs.warm_up(store)
    return True


def auth_configured() -> bool:
    """Streamlit's [auth] section is in secrets.toml: sign-in is on."""
    try:
        return "auth" in st.secrets
    except FileNotFoundError:  # no secrets.toml at all (Streamlit's StreamlitSecretNotFoundError)
        return False


@st.cache_resource
def _announce(notice: str) -> None:
    """Say once per app process (and again if it changes) who may edit, where the app was started."""
    print(notice, flush=True)


def account_ui(signed_in: bool) -> None:
    """The sidebar's line on who is editing: the account and its sign-out, or this computer only."""
    if signed_in:
        st.sidebar.caption(f"Signed in as {st.user.get('email') or st.user.get('name') or 'you'}")
        st.sidebar.button("Sign out", on_click=st.logout, key="app_sign_out", icon=":material/logout:")
    else:
        st.sidebar.caption("No sign-in configured: this app can be edited from this computer only.")


def project_picker_ui(store) -> None:
    """The current project, shared by every page as st.session_state['app_project'] and kept in
    the URL (?project=...) so a refresh returns to it."""
    names = [p.name for p in store.list_projects()]
    current = st.session_state.get("app_project") or st.query_params.get("project")
    if current not in names:
        current = None
    st.session_state["app_project"] = current
    st.session_state["app_project_picker"] = current  # pages change app_project; the picker follows

    def picked():
        st.session_state["app_project"] = st.session_state["app_project_picker"]

    st.sidebar.selectbox("Project", names, key="app_project_picker", on_change=picked,
                         placeholder="Choose a project")
    if current:
        st.query_params["project"] = current
        counts = store.counts(current)
        st.sidebar.caption(f"{len(counts)} categories, {sum(counts.values())} images")
    else:
        st.query_params.pop("project", None)


if os.environ.get("NANOSTREAM_DEMO_ONLY") == "1":
    st.navigation([DEMO], position="hidden").run()
    st.stop()

auth, editors = auth_configured(), access.Editors.from_env()
_announce(access.startup_notice(auth, editors))
visitor = access.visitor_from(st.user, st.context.ip_address, st.context.headers)
st.session_state["app_access"] = decision = access.decide(visitor, auth, editors)
if not decision.can_edit:  # nothing of the projects: the page that says why, and demo links
    st.navigation([WELCOME, DEMO], position="hidden").run()
    st.stop()

_app_ready(str(ui.open_store().root))
# A demo link (/demo?model=...) shows no navigation: the person holding it sees the model only.
page = st.navigation({"NanoStream": [*STEPS, DEMO]}, position="hidden" if "model" in st.query_params else "sidebar")
if page.url_path != "demo":
    project_picker_ui(ui.open_store())
    account_ui(visitor.signed_in)
page.run()

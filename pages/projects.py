"""Step 1: create, open, rename and delete projects."""

import streamlit as st

from nanostream import ui
from nanostream.jobs import active_job
from nanostream.flows.sample import SAMPLE_NAME, create_sample_project
from nanostream.store.records import StoreError

ui.run_through_app()
store = ui.open_store()
st.title("NanoStream")
st.markdown("Name a few categories, add a few photos of each, press **Build**: you get an image "
            "classifier you can test and share. New here? Open the sample project and press Build.")
message = st.empty()


def open_project(name: str, page: str = "pages/images.py") -> None:
    st.session_state["app_project"] = name
    st.switch_page(page)


st.subheader("Your projects")
projects = store.list_projects()
if not projects:
    st.info("No projects yet: create one below.")
current = st.session_state.get("app_project")
for project in projects:
    counts = store.counts(project.name)
    versions = len(store.list_models(project.name))
    with st.container(border=True):
        info, open_col, edit_col = st.columns([5, 1, 1], vertical_alignment="center")
        info.markdown(f"**{project.name}**" + ("  · _open now_" if project.name == current else ""))
        info.caption(f"{len(counts)} categories · {sum(counts.values())} images · {versions} model versions")
        if open_col.button("Open", key=f"projects_open_{project.id}", type="primary", width="stretch"):
            open_project(project.name)
        with edit_col.popover("Edit", width="stretch"):
            new_name = st.text_input("New name", value=project.name, key=f"projects_name_{project.id}")
            if st.button("Rename", key=f"projects_rename_{project.id}"):
                try:
                    renamed = store.rename_project(project.name, new_name)
                except StoreError as exc:
                    message.error(f"Cannot rename: {exc}.")
                else:
                    if current == project.name:
                        st.session_state["app_project"] = renamed.name
                    st.rerun()
            st.divider()
            sure = st.checkbox("Delete it with its images", key=f"projects_sure_{project.id}")
            if st.button("Delete project", key=f"projects_delete_{project.id}", disabled=not sure):
                if active_job(store, project.name, "build"):
                    message.error(f"'{project.name}' is building a model: cancel the build on the Build page first.")
                else:
                    store.delete_project(project.name)
                    if current == project.name:
                        st.session_state["app_project"] = None
                    st.rerun()

with st.form("projects_create", clear_on_submit=True, border=True):
    st.subheader("New project")
    name = st.text_input("Project name", placeholder="e.g. Garden birds", key="projects_new_name")
    categories = st.text_input("Categories (optional, comma-separated)", placeholder="e.g. robin, blackbird, sparrow",
                               key="projects_new_categories")
    if st.form_submit_button("Create project", type="primary"):
        try:
            project = store.create_project(name, [c for c in categories.split(",") if c.strip()])
        except StoreError as exc:
            st.error(f"Cannot create the project: {exc}.")
        else:
            open_project(project.name, "pages/categories.py")

if SAMPLE_NAME not in {p.name for p in projects}:
    if st.button("Add the sample project (15 ants, 15 bees)", key="projects_sample"):
        try:
            project, _ = create_sample_project(store)
        except StoreError as exc:
            message.error(f"Cannot add the sample project: {exc}.")
        else:
            open_project(project.name)

"""Step 6: publish a version, share its demo link (the project's, which lasts), call it over HTTP, download it.
Only editors reach this page (app.py), so only editors create API keys."""

import os
import time

import streamlit as st

from nanostream import ui
from nanostream.flows import publish
from nanostream.ui import share as share_ui

# `nanostream serve` runs the HTTP API apart from this app; say where people reach it.
API_URL = os.environ.get("NANOSTREAM_API_URL", "http://localhost:8000")

ui.run_through_app()
store = ui.open_store()
project = ui.require_project()
st.header("Share")
models = ui.require_models(store, project)

by_id = {m.model_id: m for m in models}
st.dataframe([{"version": m.model_id, "built": ui.ago(time.time() - m.created_at),
               "accuracy": f"{m.metrics.get('accuracy', 0):.0%}", "published": "yes" if m.published else ""}
              for m in models], hide_index=True)
model_id = st.selectbox("Version", list(by_id), key="share_model")
record = by_id[model_id]
share_ui.credits_ui(record.bundle_path)

st.subheader("Demo link")
base = publish.public_base_url(os.environ.get("NANOSTREAM_PUBLIC_URL"), st.get_option("browser.serverAddress"),
                               st.get_option("browser.serverPort"), publish.app_base_url(st.context.url, "share"))
if record.published:
    link = base + publish.project_demo_path(project)
    st.success("Published: anyone with this link can try the model (they see only the model, not the project). "
               "The link stays the same when you publish a newer version: it always shows the published one.")
    st.code(link, language=None)
    st.link_button("Open the demo page", link, icon=":material/open_in_new:")
    st.caption("This version alone, while it is published (renaming the project changes the link above):")
    st.code(publish.demo_url(base, model_id), language=None)
    if publish.is_local_host(base):
        st.warning(publish.LOCAL_LINK_WARNING)
    if st.button("Unpublish", key="share_unpublish"):
        publish.unpublish(store, model_id)
        st.rerun()
else:
    st.caption("Not published: only you can use this version. Publishing gives a demo link for anyone "
               "and opens the HTTP API to callers without a key. Other versions of this project are unpublished.")
    if st.button("Publish this version", type="primary", key="share_publish"):
        try:
            publish.publish(store, model_id)
        except publish.PublishError as exc:
            st.error(str(exc))
        else:
            st.rerun()

st.subheader("HTTP API")
st.caption(f"Start the API server with `python -m nanostream serve --port 8000` (this page assumes it at {API_URL}; "
           "set NANOSTREAM_API_URL to change that)." + ("" if record.published else
           " This version is not published, so calls need an API key."))
snippets = publish.api_snippets(API_URL, model_id, record.published)
st.code(snippets.curl, language="bash")
st.code(snippets.python, language="python")

with st.expander("API keys"):
    share_ui.api_keys_ui()

st.subheader("Download")
share_ui.downloads_ui(model_id, record.bundle_path)

"""Step 6: publish a version, share its demo link, call it over HTTP, download it."""

import os
import time
from pathlib import Path

import streamlit as st

from nanostream.store import keys
from nanostream import ui
from nanostream.engine.bundle import BundleError
from nanostream.engine.models import export_path
from nanostream.flows import publish

# `nanostream serve` runs the HTTP API apart from this app; say where people reach it.
API_URL = os.environ.get("NANOSTREAM_API_URL", "http://localhost:8000")
EXPORTS = {"onnx": ("ONNX", "onnx"), "torchscript": ("TorchScript", "pt")}

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

st.subheader("Demo link")
if record.published:
    link = publish.demo_url(publish.app_base_url(st.context.url, "share"), model_id)
    st.success("Published: anyone with this link can try the model (they see only the model, not the project).")
    st.code(link, language=None)
    st.link_button("Open the demo page", link, icon=":material/open_in_new:")
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
    with st.form("share_key_form", clear_on_submit=True):
        name = st.text_input("Name for a new key (optional)", placeholder="e.g. phone-app")
        if st.form_submit_button("Create key"):
            try:
                key_record, key = keys.create_key(name.strip() or None)
            except keys.KeysError as exc:
                st.error(str(exc))
            else:
                st.session_state["share_new_key"] = (key_record.name, key)
    if "share_new_key" in st.session_state:
        key_name, key = st.session_state.pop("share_new_key")
        st.success(f"Key '{key_name}' created. Copy it now: it is shown only this once.")
        st.code(key, language=None)
    try:
        existing = keys.list_keys()
    except keys.KeysError as exc:
        st.error(str(exc))
        existing = []
    for k in existing:
        text, action = st.columns([4, 1], vertical_alignment="center")
        text.markdown(f"`{k.name}` created {k.created_at}" + (f" · **revoked** {k.revoked_at}" if k.revoked else ""))
        if not k.revoked and action.button("Revoke", key=f"share_revoke_{k.name}"):
            keys.revoke_key(k.name)
            st.rerun()

st.subheader("Download")
bundle = Path(record.bundle_path)
if bundle.is_file():
    st.download_button("Model bundle (.safetensors: weights, labels, preprocessing)", bundle.read_bytes(),
                       file_name=f"{model_id}.safetensors", icon=":material/download:")
else:
    st.error("The model file of this version is missing: nothing to download or export. Build it again.")
for fmt, (label, ext) in EXPORTS.items():
    try:
        out = export_path(model_id, ext)  # refuses an id NanoStream did not make: it could be a path
    except BundleError as exc:
        st.error(f"This version cannot be exported: {exc}")
        break
    labels = out.with_suffix(".labels.json")  # export.py writes the labels and preprocessing beside the model
    if out.is_file() and labels.is_file():
        left, right = st.columns(2)
        left.download_button(f"{label} file", out.read_bytes(), file_name=out.name, key=f"share_dl_{fmt}")
        right.download_button(f"{label} labels and preprocessing (.json)", labels.read_bytes(),
                              file_name=labels.name, key=f"share_dl_{fmt}_labels")
    elif bundle.is_file() and st.button(f"Prepare the {label} file", key=f"share_export_{fmt}"):
        from nanostream.engine.export import export_model

        with st.spinner(f"Exporting to {label}…"):
            try:
                export_model(bundle, fmt, out)
            except Exception as exc:  # noqa: BLE001 - an export failure is a message, not a crash
                st.error(f"Export to {label} failed: {exc}")
            else:
                st.rerun()

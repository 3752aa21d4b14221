"""The Share page's widgets: API keys (create once, show once, revoke) and the model downloads.
Only editors reach the Share page (app.py), so only editors create keys here."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ..engine.bundle import BundleError, read_header
from ..engine.models import export_path
from ..store import keys, licenses

EXPORTS = {"onnx": ("ONNX", "onnx"), "torchscript": ("TorchScript", "pt")}


def api_keys_ui() -> None:
    """Create a key (shown this once), list every key, revoke one."""
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


def downloads_ui(model_id: str, bundle_path: str) -> None:
    """The bundle, and each export once prepared (a button prepares it)."""
    bundle = Path(bundle_path)
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
            from ..engine.export import export_model

            with st.spinner(f"Exporting to {label}…"):
                try:
                    export_model(bundle, fmt, out)
                except Exception as exc:  # noqa: BLE001 - an export failure is a message, not a crash
                    st.error(f"Export to {label} failed: {exc}")
                else:
                    st.rerun()


def credits_ui(bundle_path: str) -> None:
    """What a model's photos allow ("Trained on 60 photos: 41 CC BY, 12 CC0, 7 unknown licence")
    with a link to its credits, one line per photo, below (store.licenses.bundle_credits)."""
    try:
        meta = read_header(bundle_path).meta  # the header alone: no torch, no tensors
    except (BundleError, OSError):
        return  # the pages say elsewhere that the model cannot be loaded
    sentence = licenses.trained_on(meta.get("licenses"))
    if not sentence:
        st.caption("This version does not say what licences its photos have: it was built before NanoStream "
                   "counted them. Build it again to see them.")
        return
    st.caption(f"{sentence[0].upper()}{sentence[1:]}. [See the credits](#credits)")
    st.subheader("Credits", anchor="credits")
    with st.expander(f"{len(licenses.header_credits(meta))} photos, with their licences and sources"):
        text = licenses.attribution_markdown(meta.get("name") or meta.get("project") or meta["model_id"],
                                             licenses.header_credits(meta))
        st.markdown(text.split("\n", 1)[1])  # its own title is the subheader above

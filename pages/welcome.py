"""The page for someone who may not edit: why not, and the sign-in where sign-in is on.
app.py's access decision is in st.session_state["app_access"]; nothing here reads a project."""

import streamlit as st

from nanostream import ui

ui.run_through_app()
decision = st.session_state["app_access"]
st.title("NanoStream")
st.markdown("Image classifiers made from a few photos. Someone who shares a model sends you a demo link "
            "(`…/demo?project=…`): open it to try the model, no account needed.")
st.info(decision.notice)
if decision.sign_in:
    st.button("Sign in", type="primary", on_click=st.login, key="welcome_sign_in", icon=":material/login:")
elif st.user.get("is_logged_in"):
    st.button("Sign out", on_click=st.logout, key="welcome_sign_out", icon=":material/logout:")

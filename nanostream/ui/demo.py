"""The demo page's rate limit: each visitor's photos spend tokens of a bucket of their own
(access.demo_budget); the page shows the refusal this returns."""

from __future__ import annotations

import hashlib
import math

import streamlit as st

from .. import access


@st.cache_resource
def demo_limiter(budget: access.Budget) -> access.RateLimiter:
    """One bucket per visitor address, shared by every session of this app process."""
    return access.RateLimiter(budget.per_minute, budget.burst)


def demo_refusal(photo) -> str | None:
    """Spend one of this visitor's tokens on a photo other than the last one classified (a rerun of
    the page, or the same bytes again, reuses ui.predictions' answer): None when it may be
    classified; with no token left, the sentence saying when to try again."""
    digest = hashlib.sha256(photo.getvalue()).hexdigest()
    if st.session_state.get("demo_charged") == digest:
        return None
    budget = access.demo_budget()
    visitor = access.visitor_from(st.user, st.context.ip_address, st.context.headers)
    wait = demo_limiter(budget).wait(access.client_of(visitor.ip_address or "127.0.0.1"))  # None: this computer
    if wait:
        return (f"Too many photos in a short time: this demo classifies {budget.burst} at once and "
                f"{budget.per_minute:g} a minute for each visitor. Try again in {math.ceil(wait)} s.")
    st.session_state["demo_charged"] = digest
    return None

"""Schemathesis hooks for tests/test_api_schema.py: the URLs it generates never wait on DNS.

The test machines have no network, and their resolver stalls ~5 s on some failed lookups, so
hostnames would make the run slow for no gain. URLs on the documentation addresses (RFC 5737,
RFC 3849) reach the same refusals -- scheme, private address -- without a lookup.
"""

import string

import schemathesis
from hypothesis import strategies as st

schemathesis.openapi.format("uri", st.builds(
    "{}://{}/{}".format,
    st.sampled_from(["http", "https", "ftp"]),
    st.sampled_from(["192.0.2.1", "198.51.100.7", "[2001:db8::1]"]),
    st.text(string.ascii_letters + string.digits + "-._~/", max_size=16),
))

"""Step 2: the categories the model tells apart, each with optional extra words for the web search."""

import streamlit as st

from nanostream import ui
from nanostream.store.records import StoreError

ui.run_through_app()
store = ui.open_store()
project = ui.require_project()
st.header("Categories")
st.caption("Each category is one answer the model can give. The web search looks for the category's name, "
           "plus any extra words you give it (e.g. 'bird' after 'robin', so you get birds, not Batman).")
message = st.empty()

with st.form("categories_add", clear_on_submit=True):
    names = st.text_input("Add categories", placeholder="one or more names, comma-separated: cat, dog",
                          key="categories_new")
    if st.form_submit_button("Add", type="primary"):
        errors = []
        for name in [n for n in names.split(",") if n.strip()] or [""]:
            try:
                store.add_category(project, name)
            except StoreError as exc:
                errors.append(str(exc))
        if errors:
            message.error("Not added: " + "; ".join(errors) + ".")

categories = store.list_categories(project)
counts = store.counts(project)
if not categories:
    st.info("No categories yet: add at least two above.")
for category in categories:
    with st.form(f"categories_edit_{category.id}"):
        name_col, terms_col, count_col = st.columns([2, 3, 1], vertical_alignment="bottom")
        new_name = name_col.text_input("Name", value=category.name, key=f"categories_name_{category.id}")
        terms = terms_col.text_input("Extra search words", value=category.search_terms, key=f"categories_terms_{category.id}",
                                     placeholder="optional, comma-separated", help="Each becomes its own search: "
                                     "'robin' with 'bird, garden' searches 'robin bird' and 'robin garden' too.")
        count_col.metric("Images", counts.get(category.name, 0))
        save_col, remove_col, sure_col = st.columns([1, 1, 4], vertical_alignment="center")
        sure = sure_col.checkbox(f"Also delete its {counts.get(category.name, 0)} images when removing",
                                 key=f"categories_sure_{category.id}")
        if save_col.form_submit_button("Save"):
            try:
                name = category.name
                if new_name.strip() != name:
                    name = store.rename_category(project, name, new_name).name
                if terms.strip() != category.search_terms:
                    store.set_search_terms(project, name, terms)
            except StoreError as exc:
                message.error(f"Cannot save '{category.name}': {exc}.")
            else:
                st.rerun()
        if remove_col.form_submit_button("Remove"):
            if counts.get(category.name, 0) and not sure:
                message.error(f"'{category.name}' has {counts[category.name]} images: tick 'Also delete its images' "
                              f"to remove it, or move them to another category on the Images page first.")
            else:
                store.remove_category(project, category.name)
                st.rerun()

if len(categories) >= 2:
    st.page_link("pages/images.py", label="Next: add images", icon=":material/arrow_forward:")

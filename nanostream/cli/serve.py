"""Serving commands: `serve`, `keys create|list|revoke`, `export`, `publish` and `unpublish`."""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path

from .common import UserError, emit, checked_model, subcommands


def cmd_serve(args) -> None:
    import uvicorn

    from ..api.app import ServeConfig, create_app

    try:  # a clear one-line error now beats uvicorn's log line and exit status 1 later
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    config = ServeConfig(batching=not args.no_batching)
    print(f"serving on http://{args.host}:{args.port} (API docs at /docs), "
          f"batching {'on' if config.batching else 'off'}", flush=True)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info")


def cmd_keys_create(args) -> None:
    from ..store.keys import create_key

    record, key = create_key(args.name)
    if args.json:
        print(f"created key '{record.name}'; it is shown once, store it now")
        print(json.dumps({**record.public(), "key": key}))
    else:
        print(f"created key '{record.name}'; it is shown once, store it now. Send it as "
              f"'Authorization: Bearer <key>'. The key:")
        print(key)


def cmd_keys_list(args) -> None:
    from ..store.keys import list_keys

    rows = [k.public() for k in list_keys()]
    text = "\n".join(f"{r['name']:<24} created {r['created_at']}"
                     + (f"  revoked {r['revoked_at']}" if r["revoked"] else "") for r in rows)
    emit(args, text or "no keys yet (`nanostream keys create`)", rows)


def cmd_keys_revoke(args) -> None:
    from ..store.keys import revoke_key

    record = revoke_key(args.name)
    emit(args, f"revoked key '{record.name}' at {record.revoked_at}", record.public())


def cmd_export(args) -> None:
    path = checked_model(args.model)
    from ..engine.export import export_model

    result = export_model(path, args.format, args.out)
    emit(args, f"exported {result.model_id} as {result.format} -> {result.path}\nlabels and preprocessing -> "
                f"{result.labels_path}",
          {"model_id": result.model_id, "format": result.format, "path": str(result.path),
           "labels": str(result.labels_path)})


def demo_path(model_id: str) -> str:
    return f"/demo?model={model_id}"


def set_published(ref: str, published: bool) -> str:
    """Publish or unpublish a model by id or bundle file; returns its id.

    A file is the model its bytes make (models.content_model_id; the registry's own file is its
    id), never the one its header claims, so a file cannot publish another model by naming it;
    publishing copies it into the registry under that id. Unpublishing reads no model file, so
    a damaged one can always be closed again.
    """
    from ..engine.models import content_model_id, import_bundle, registered_id

    path = Path(ref)
    if path.is_file():
        if published:
            checked_model(ref)  # a bad file: one line naming it, before anything is copied
        ref = registered_id(path) or (import_bundle(path) if published else content_model_id(path))
    return _publish(ref) if published else _unpublish(ref)


def _publish(model_id: str) -> str:
    from ..engine.bundle import MODEL_ID, BundleError
    from ..engine.models import model_path, read_registered
    from ..store.db import Store, StoreError

    if not MODEL_ID.fullmatch(model_id):
        raise UserError(f"no model file or model id '{model_id[:200]}' (ids are listed by `nanostream models`)")
    with Store() as store:
        try:
            record = store.get_model(model_id)
        except StoreError:  # trained from a folder, or just imported: the store learns of it now
            record = None
        registered = model_path(model_id)
        bundle = registered if registered.is_file() or record is None else Path(record.bundle_path)
        try:
            meta = read_registered(model_id, bundle).meta  # sound before anyone may use it
        except BundleError as exc:
            raise UserError(f"cannot publish {model_id}: {exc}") from None
        if record is None:
            created = datetime.datetime.fromisoformat(meta["created_at"]).timestamp()
            try:
                store.record_model(meta.get("project"), model_id, bundle, meta["metrics"], created)
            except StoreError:  # its project is gone or was never in this store
                store.record_model(None, model_id, bundle, meta["metrics"], created)
        store.set_published(model_id, True)
    return model_id


def _unpublish(model_id: str) -> str:
    """By the store alone: any id it holds, even one an older NanoStream let in unchecked."""
    from ..engine.bundle import MODEL_ID
    from ..engine.models import model_path
    from ..store.db import Store, StoreError

    with Store() as store:
        try:
            store.set_published(model_id, False)
        except StoreError:  # never published: nothing to close, if the model exists at all
            if not (MODEL_ID.fullmatch(model_id) and model_path(model_id).is_file()):
                raise UserError(f"no model '{model_id[:200]}' (ids are listed by `nanostream models`)") from None
    return model_id


def cmd_publish(args) -> None:
    model_id = set_published(args.model, True)
    path = demo_path(model_id)
    payload = {"model_id": model_id, "published": True, "demo": path}
    if args.json:
        emit(args, f"published {model_id}: anyone may use it without an API key", payload)
    else:
        print(f"published {model_id}: anyone may use it without an API key; demo page:")
        print(path)


def cmd_unpublish(args) -> None:
    model_id = set_published(args.model, False)
    emit(args, f"unpublished {model_id}: it needs an API key again",
          {"model_id": model_id, "published": False})


def register(sub, command) -> None:
    p = command("serve", cmd_serve, "serve the HTTP API (docs at /docs)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-batching", action="store_true",
                   help="one forward pass per request (the benchmark's baseline)")

    key_command = subcommands(command("keys", None, "API keys: create, list, revoke"), "keys_command")
    key_command("create", cmd_keys_create, "create a key; it is printed once, alone on the last line") \
        .add_argument("--name", help="a label to list and revoke it by (default key-N)")
    key_command("list", cmd_keys_list, "keys with their names and dates (never the keys)")
    key_command("revoke", cmd_keys_revoke, "revoke a key by name").add_argument("name")

    p = command("export", cmd_export, "export a model as ONNX or TorchScript, with a .labels.json beside it")
    p.add_argument("model", help="bundle path or model_id")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, help="output file; labels go to the same name with .labels.json")

    p = command("publish", cmd_publish, "open a model to anyone (no API key); prints its demo path last")
    p.add_argument("model", help="model_id, or a bundle file: registered under the id its bytes give")
    p = command("unpublish", cmd_unpublish, "require an API key for a model again")
    p.add_argument("model", help="model_id or bundle path")

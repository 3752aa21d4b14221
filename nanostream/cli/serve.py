"""Serving commands: `serve`, `keys create|list|revoke`, `export`, `publish` and `unpublish`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .common import UserError, emit, checked_model, subcommands


def cmd_serve(args) -> None:
    import uvicorn

    from ..api.app import create_app
    from ..api.service import ServeConfig

    try:  # a clear one-line error now beats uvicorn's log line and exit status 1 later
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    config = ServeConfig(batching=not args.no_batching, share_backbones=not args.per_model_batching)
    batching = ("off" if not config.batching else "per model" if not config.share_backbones
                else "on, across models that share a backbone")
    print(f"serving on http://{args.host}:{args.port} (API docs at /docs), batching {batching}", flush=True)
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


def set_published(ref: str, published: bool):
    """Publish or unpublish a model by id or bundle file (flows.publish: one published version per
    project); returns the flow's Publication.

    A file is the model its bytes make (models.content_model_id; the registry's own file is its
    id), never the one its header claims, so a file cannot publish another model by naming it;
    publishing copies it into the registry under that id. Unpublishing reads no model file, so
    a damaged one can always be closed again.
    """
    from ..engine.models import content_model_id, import_bundle, registered_id
    from ..flows.publish import publish, unpublish
    from ..store.db import Store

    path = Path(ref)
    if path.is_file():
        if published:
            checked_model(ref)  # a bad file: one line naming it, before anything is copied
        ref = registered_id(path) or (import_bundle(path) if published else content_model_id(path))
    with Store() as store:
        return publish(store, ref) if published else unpublish(store, ref)


def cmd_publish(args) -> None:
    """Prints the project's stable demo link (with NANOSTREAM_PUBLIC_URL in front where set) above
    the version's own path, which stays alone on the last line (scripts read it)."""
    from ..flows.publish import PUBLIC_URL_ENV, public_base_url

    done = set_published(args.model, True)
    closed = f"; unpublished {', '.join(done.unpublished)} (one published version per project)" if done.unpublished else ""
    base = public_base_url(os.environ.get(PUBLIC_URL_ENV), None, None, "")  # "" when unset: a path alone
    stable = base + done.project_demo_path if done.project_demo_path else None
    payload = {"model_id": done.model_id, "published": True, "demo": done.demo_path,
               "project_demo": stable, "unpublished": list(done.unpublished)}
    if args.json:
        emit(args, f"published {done.model_id}: anyone may use it without an API key{closed}", payload)
        return
    print(f"published {done.model_id}: anyone may use it without an API key{closed}")
    if stable:
        print(f"project demo link (always the published version): {stable}")
    print("this version's demo page:")
    print(done.demo_path)


def cmd_unpublish(args) -> None:
    done = set_published(args.model, False)
    emit(args, f"unpublished {done.model_id}: it needs an API key again",
          {"model_id": done.model_id, "published": False})


def register(sub, command) -> None:
    p = command("serve", cmd_serve, "serve the HTTP API (docs at /docs)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-batching", action="store_true",
                   help="one forward pass per request (the benchmark's baseline)")
    p.add_argument("--per-model-batching", action="store_true",
                   help="batch each model's requests apart, not across models on one backbone "
                        "(the many-models benchmark's baseline)")

    key_command = subcommands(command("keys", None, "API keys: create, list, revoke"), "keys_command")
    key_command("create", cmd_keys_create, "create a key; it is printed once, alone on the last line") \
        .add_argument("--name", help="a label to list and revoke it by (default key-N)")
    key_command("list", cmd_keys_list, "keys with their names and dates (never the keys)")
    key_command("revoke", cmd_keys_revoke, "revoke a key by name").add_argument("name")

    p = command("export", cmd_export, "export a model as ONNX or TorchScript, with a .labels.json beside it")
    p.add_argument("model", help="bundle path or model_id")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, help="output file; labels go to the same name with .labels.json")

    p = command("publish", cmd_publish, "open a model to anyone (no API key); prints its project's demo link, "
                                        "and its own demo path last")
    p.add_argument("model", help="model_id, or a bundle file: registered under the id its bytes give")
    p = command("unpublish", cmd_unpublish, "require an API key for a model again")
    p.add_argument("model", help="model_id or bundle path")

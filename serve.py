"""
Serve a trained policy over openpi's websocket protocol, so robot code written for openpi's clients connects as is.

    python serve.py --checkpoint out/demo/step_000500                   # ws://127.0.0.1:8000, GPU when there is one
    python serve.py --checkpoint CKPT --host 0.0.0.0 --api_key SECRET   # reachable from the robot, key required

On connect the server sends one binary frame, the msgpack'd metadata (cameras, chunk, action_dim, ...); then every
binary frame from the client is a msgpack-numpy observation {"images": {camera: HxWx3 uint8}, "prompt": str,
"state": (proprio_dim,) when trained with --proprio}, answered with {"actions": (chunk, action_dim) float32 in raw
units, "server_timing": {"infer_ms": ...}}, or with a text frame naming what is wrong. On the robot
(pip install openpi-client==0.1.2; beside this project's numpy 2 with --no-deps, see docs/serving.md):

    from openpi_client import websocket_client_policy
    policy = websocket_client_policy.WebsocketClientPolicy("gpu-box", 8000)
    actions = policy.infer({"images": {"head_camera_image": rgb}, "prompt": "place the shoe"})["actions"]

GET /healthz answers 200 (without a key). Requests of all clients are served one at a time on the model.
"""

import argparse
import asyncio
import hmac
import http
import os
import signal
import socket
import sys
import time
import traceback

import msgpack
import numpy as np
import torch
import websockets
from websockets.asyncio.server import serve

import data
import infer
import model


def pack_array(obj):
    """msgpack-numpy's wire form of arrays and numpy scalars, as openpi-client reads it."""
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def unpack_array(obj):
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.hasobject or dtype.kind == "V":  # object and structured arrays are no camera frame or state
            raise ValueError(f"unsupported array dtype {dtype}")
        return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj):
    return msgpack.packb(obj, default=pack_array)


def describe(x):
    return f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__


def expected_keys(policy):
    """The keys a request must hold: a checkpoint trained with --instruction has that as its default prompt."""
    return ["images"] + ["prompt"] * (not policy.args.get("instruction")) + ["state"] * bool(policy.vla.proprio_dim)


def metadata(policy, checkpoint):
    vla = policy.vla
    return {
        "cameras": policy.cameras,
        "checkpoint": os.path.abspath(checkpoint),
        "keys": expected_keys(policy),
        "frame_sizes": {c: list(policy.frame_sizes[c]) for c in policy.cameras},
        "chunk": vla.chunk,
        "action_dim": vla.action_dim,
        "proprio_dim": vla.proprio_dim,
        "action_offset": policy.args["action_offset"],
        "instruction": policy.args.get("instruction"),
        "action_names": data.action_names(vla.action_dim),
    }


def parse(policy, message):
    """The (images, prompt, state) of one request, or a ValueError naming what is wrong with it. Keys and cameras
    the policy does not read are ignored, as openpi's policies do; no prompt means the checkpoint's --instruction."""
    if isinstance(message, str):
        raise ValueError("expected a binary frame holding a msgpack'd observation, got a text frame")
    try:
        obs = msgpack.unpackb(message, object_hook=unpack_array)
    except Exception as e:  # msgpack's own errors, a dtype numpy does not know, data too short for the shape
        raise ValueError(f"the request is not msgpack-numpy: {type(e).__name__}: {e}") from None
    if not isinstance(obs, dict):
        raise ValueError(f"expected a dict observation with {', '.join(expected_keys(policy))}, got {describe(obs)}")
    images = obs.get("images")
    if not isinstance(images, dict):
        raise ValueError(f"images: expected a dict camera name -> HxWx3 uint8 array, got {describe(images)}")
    missing = [c for c in policy.cameras if c not in images]
    if missing:
        raise ValueError(
            f"images: missing camera(s) {', '.join(missing)} (this policy reads "
            f"{', '.join(policy.cameras)}; got {', '.join(map(str, images)) or 'none'})"
        )
    for c in policy.cameras:
        x = images[c]
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3 or not x.size:
            raise ValueError(f"images[{c!r}]: expected an HxWx3 uint8 RGB array, got {describe(x)}")
    prompt = obs.get("prompt")
    prompt = policy.args.get("instruction") if prompt is None else prompt  # as Policy.predict's default
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt: expected the instruction as a non-blank str, got {obs.get('prompt')!r:.60}")
    state, dim = obs.get("state"), policy.vla.proprio_dim
    if dim:
        try:
            state = np.asarray(state, np.float64)
        except (TypeError, ValueError):
            state = None
        if state is None or state.shape != (dim,) or not np.isfinite(state).all():
            raise ValueError(
                f"state: this policy was trained with proprioception: expected the raw ({dim},) joint "
                f"state, finite numbers, got {describe(obs.get('state'))}"
            )
    return images, prompt, state if dim else None


async def run(policy, sock, meta, api_key=None):
    """Serve until SIGINT or SIGTERM; returns the signal's name. The model runs in a worker thread, one request at a
    time, so the event loop keeps answering pings, handshakes and health checks while it works."""
    loop, lock = asyncio.get_running_loop(), asyncio.Lock()
    stop = loop.create_future()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, lambda s=s: stop.done() or stop.set_result(s.name))
    hello = packb(meta)

    def predict(images, prompt, state):
        t0 = time.perf_counter()
        actions = policy.predict(images, prompt, state).astype(np.float32)
        return actions, 1000 * (time.perf_counter() - t0)

    async def handler(ws):
        client, served, prev_total = "{}:{}".format(*ws.remote_address[:2]), 0, None
        print(f"{client} connected", flush=True)
        try:
            await ws.send(hello)
            async for message in ws:
                t0 = time.perf_counter()
                try:
                    request = parse(policy, message)
                    async with lock:
                        actions, infer_ms = await asyncio.to_thread(predict, *request)
                except ValueError as e:
                    print(f"{client}: bad request: {e}", flush=True)
                    await ws.send(f"bad request: {e}")
                    continue
                except Exception as e:  # a failure inside the model: this request fails, the server keeps serving
                    traceback.print_exc()
                    await ws.send(f"inference failed: {type(e).__name__}: {e}")
                    continue
                timing = {"infer_ms": infer_ms} | ({"prev_total_ms": prev_total} if prev_total is not None else {})
                await ws.send(packb({"actions": actions, "server_timing": timing}))
                served, prev_total = served + 1, 1000 * (time.perf_counter() - t0)
        except websockets.ConnectionClosed:
            pass
        print(f"{client} disconnected after {served} chunk(s)", flush=True)

    def process_request(ws, request):
        if request.path == "/healthz":  # for load balancers and start-up scripts, which hold no key
            return ws.respond(http.HTTPStatus.OK, "OK\n")
        given = request.headers.get("Authorization", "").encode()  # bytes: compare_digest refuses non-ASCII str
        if api_key and not hmac.compare_digest(given, f"Api-Key {api_key}".encode()):
            print(f"{'{}:{}'.format(*ws.remote_address[:2])}: refused, missing or wrong API key", flush=True)
            return ws.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        return None

    # as openpi's server: no compression (camera frames hardly compress), no size limit (frames exceed the 1 MiB one)
    async with serve(handler, sock=sock, compression=None, max_size=None, process_request=process_request):
        host, port = sock.getsockname()[:2]
        print(
            f"serving {meta['checkpoint']} on ws://{host}:{port} ({', '.join(policy.cameras)} | chunk "
            f"{meta['chunk']} x {meta['action_dim']} | proprio {meta['proprio_dim']} | {policy.device}"
            f"{' | API key required' if api_key else ''}); Ctrl-C stops",
            flush=True,
        )
        stopped_by = await stop
    return stopped_by


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step_NNNNNN directory or a merged export")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept connections from other machines")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the line at start names it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--api_key",
        default=os.environ.get("NANOOFT_API_KEY"),
        help="refuse clients without `Authorization: Api-Key KEY` (default: $NANOOFT_API_KEY, which "
        "keeps the key out of the process list)",
    )
    p.add_argument("--vla_path", help="base model, overriding the one named in the checkpoint's args.json")
    args = p.parse_args(argv)
    try:
        model.check_checkpoint(args.checkpoint)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    try:
        device = torch.device("cpu" if args.device == "auto" else args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device (auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible to torch {torch.__version__}")
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart needs no wait for the old TIME_WAITs
    try:  # before the model loads (minutes for 7B): a taken port is known at once
        sock.bind((args.host, args.port))
        sock.listen()
    except OSError as e:
        sock.close()
        sys.exit(f"error: cannot listen on --host {args.host} --port {args.port}: {e.strerror or e}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api_key: anyone who reaches the port can use the policy")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM while loading ends as Ctrl-C does
    # the cores other work leaves free, not torch's default of all of them (oversubscribed, a chunk takes ~4x longer)
    torch.set_num_threads(infer.cpu_threads())
    try:
        policy = infer.Policy.from_checkpoint(args.checkpoint, device=args.device, vla_path=args.vla_path, merge=True)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("stopped while loading the checkpoint")
    try:
        meta = metadata(policy, args.checkpoint)
        print(f"stopped ({asyncio.run(run(policy, sock, meta, args.api_key))})", flush=True)
    except KeyboardInterrupt:
        sys.exit("stopped while loading the checkpoint")


if __name__ == "__main__":
    main()

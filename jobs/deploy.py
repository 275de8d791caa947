"""Deploy the Serve app (the registry's champion) on the cluster, wait until it answers, optionally classify.

    python -m jobs.submit -- python -m jobs.deploy --config configs/digits_ray.yaml
    python -m jobs.deploy --config configs/digits_ray.yaml --predict data/digits/test/3/*.png

The same application as ``serve run serve/config.yaml``: serve settings come from
the config's ``serve`` section (``--set serve.max_replicas=4``), the model from
``serve.model_name`` (else ``tracking.register_as``), the tracking server from
``tracking.tracking_uri`` (else MLFLOW_TRACKING_URI). The application keeps
running after this job exits; ``serve shutdown`` (or ``--delete``) removes it. With no
cluster to join (``--address``, RAY_ADDRESS, a ``ray start`` head on this machine) the job
starts a Ray instance of its own, which ends with it: it then says so and serves until
Ctrl-C, as ``serve run`` does.

Exit status: 0 when the endpoint answered (and every --predict image was classified),
1 on failure, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time

from imgcls_core.config import Config
from jobs.common import add_config_args, init_ray, job_config, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.deploy", description=__doc__.split("\n\n")[0])
    add_config_args(parser, ray_address=True)
    parser.add_argument("--model", help="registered model name (default: serve.model_name, else "
                                         "tracking.register_as, else 'imgcls')")
    parser.add_argument("--name", default="imgcls", help="Serve application name (default: %(default)s)")
    parser.add_argument("--route-prefix", default="/")
    parser.add_argument("--host", help="where Serve listens for HTTP when this job starts Serve (default: "
                                        "127.0.0.1); a running Serve keeps its own")
    parser.add_argument("--port", type=int, help="Serve's HTTP port when this job starts Serve (default: 8000); "
                                                 "a running Serve keeps its own")
    parser.add_argument("--predict", nargs="*", default=[], metavar="IMAGE", help="classify these files once up")
    parser.add_argument("--wait-s", type=float, default=300.0,
                        help="how long to wait for the endpoint (default: %(default)s s)")
    parser.add_argument("--delete", action="store_true", help="delete the application instead of deploying it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, cfg, done = job_config(build_parser(), argv)
    if done is not None:
        return done
    return run_main(lambda: deploy(args, cfg), what="deployment", tracking_uri=cfg.tracking.tracking_uri)


def deploy(args: argparse.Namespace, cfg: Config) -> int:
    """Deploy (or delete) the application and wait for it to answer; the exit status."""
    import os

    import ray
    from ray import serve

    from serve.app import HTTP_OPTIONS, PROXY_LOCATION, application, resolve_settings
    from serve.client import Client, EndpointError, format_predictions

    connected_before = ray.is_initialized()
    init_ray(args.address)
    own_instance = not connected_before and started_ray_here()  # the endpoint would end with this process
    if args.delete:
        serve.delete(args.name)
        print(f"deleted Serve application {args.name!r}")
        return 0
    builder_args = {"config": args.config, "overrides": args.overrides}
    if args.model:
        builder_args["model_name"] = args.model
    settings = resolve_settings(builder_args)  # a ConfigError: exit 2
    started = time.perf_counter()
    asked = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    serve.start(proxy_location=PROXY_LOCATION, http_options={**HTTP_OPTIONS, **asked})
    host, port = running_http_address(asked)
    print(f"deploying {args.name!r}: {settings['model_name']}@{cfg.serve.alias} from "
          f"{settings['tracking_uri'] or 'the default tracking URI'} ...", flush=True)
    try:
        serve.run(application(settings), name=args.name, route_prefix=args.route_prefix)
    except RuntimeError as exc:
        raise RuntimeError(f"the application did not start: {exc}") from exc
    url = f"http://{host}:{port}{args.route_prefix.rstrip('/')}"
    client = Client(url, token=os.environ.get(cfg.serve.token_env))
    deadline = time.monotonic() + args.wait_s
    while not client.ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/readyz did not answer within {args.wait_s:.0f} s")
        time.sleep(1)
    info = client.model()
    print(f"serving {info['name']} v{info['version']} at {url}/v1/predict "
          f"(docs {url}/docs) after {time.perf_counter() - started:.1f} s")
    if args.predict:
        try:
            print(format_predictions(client.predict(args.predict)))
        except EndpointError as exc:
            raise RuntimeError(f"classifying {len(args.predict)} image(s) failed: {exc}") from exc
    if own_instance:
        serve_until_interrupted()
    return 0


def running_http_address(asked: dict) -> tuple[str, int]:
    """Where the running Serve answers HTTP (``serve.start`` keeps a running Serve's options and
    only warns); RuntimeError when ``asked`` (--host/--port) differs from it."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    for key, value in asked.items():
        if getattr(http, key) != value:
            raise RuntimeError(f"Serve already listens on {http.host}:{http.port} and a running Serve keeps its "
                               f"HTTP options; leave out --{key}, or `serve shutdown` first")
    return ("127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host), http.port


def started_ray_here() -> bool:
    """Whether ray.init started a new Ray instance in this process rather than joining a cluster
    (it joins RAY_ADDRESS, else the newest `ray start` cluster on this machine). Ray has no public
    call for it: the driver's node object is the head only when this process started it."""
    import ray._private.worker

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and node.is_head())


def serve_until_interrupted() -> None:
    """Keep this process (and the Ray instance it started, with the endpoint) up until Ctrl-C."""
    from ray import serve

    print("no Ray cluster to join (--address, RAY_ADDRESS, a `ray start` head): the endpoint lives in this "
          "command's own Ray instance, so it serves until Ctrl-C. To keep it after the command exits, start "
          "a cluster first (cluster/local/start.sh) and `. cluster/local/env.sh`.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    sys.exit(main())

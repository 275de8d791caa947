"""A small client for the imgcls endpoint.

    from serve.client import Client
    client = Client("http://127.0.0.1:8000", token=os.environ.get("IMGCLS_SERVE_TOKEN"))
    result = client.predict(["3.png", "7.jpg"], top_k=3)
    result["model"]                      # {"name": "digits", "version": "4", "alias": "champion"}
    result["predictions"][0]["top_k"]    # [{"label": "3", "index": 3, "probability": 0.99}, ...]

    python -m serve.client --url http://127.0.0.1:8000 3.png 7.jpg

A 4xx/5xx answer raises :class:`EndpointError` carrying the server's ``error`` and ``detail``.
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import sys
from pathlib import Path
from typing import Any

import requests


class EndpointError(RuntimeError):
    def __init__(self, status: int, error: str, detail: str, retry_after: str | None = None):
        super().__init__(f"HTTP {status} {error}: {detail}")
        self.status, self.error, self.detail, self.retry_after = status, error, detail, retry_after


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def predict(self, images: list[str | Path | bytes], top_k: int | None = None) -> dict[str, Any]:
        """Classify image files (paths) or encoded image bytes in one request."""
        files = []
        for i, image in enumerate(images):
            if isinstance(image, (str, Path)):
                path = Path(image)
                files.append(("file", (path.name, path.read_bytes(),
                                       mimetypes.guess_type(path.name)[0] or "application/octet-stream")))
            else:
                files.append(("file", (f"image{i}", bytes(image), "application/octet-stream")))
        params = {"top_k": top_k} if top_k is not None else None
        return self._check(self.session.post(f"{self.url}/v1/predict", files=files, params=params,
                                             timeout=self.timeout_s))

    def model(self) -> dict[str, Any]:
        return self._check(self.session.get(f"{self.url}/v1/model", timeout=self.timeout_s))

    def ready(self) -> bool:
        try:
            return self.session.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    @staticmethod
    def _check(response: requests.Response) -> dict[str, Any]:
        if response.status_code == 200:
            return response.json()
        try:
            body = response.json()
            if not isinstance(body, dict):  # a proxy's JSON list or string: shown as text
                raise ValueError(body)
            error, detail = body.get("error", "error"), body.get("detail", response.text)
        except ValueError:  # Serve's proxy answers overload (503) and timeouts (408) in plain text
            error, detail = response.reason or "error", response.text.strip()
        raise EndpointError(response.status_code, error, detail, response.headers.get("Retry-After"))


def format_predictions(result: dict[str, Any]) -> str:
    model = result["model"]
    lines = [f"model {model['name']} v{model['version']}" + (f" (@{model['alias']})" if model.get("alias") else "")]
    for item in result["predictions"]:
        best = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in item["top_k"])
        present = ""
        if "labels" in item:  # a multi-label model: every class at or over its threshold
            names = "|".join(p["label"] for p in item["labels"]) or "none"
            present = f"; labels {names} (threshold {item.get('threshold', 0.5):.3f})"
        lines.append(f"  {item['file']}: {best}{present}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.client", description="Classify images with the endpoint.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--url", default=os.environ.get("IMGCLS_SERVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--token-env", default="IMGCLS_SERVE_TOKEN", help="environment variable holding the token")
    parser.add_argument("--per-request", type=int, default=16,
                        help="files per request (the server refuses more than serve.max_files, 32 by default)")
    args = parser.parse_args(argv)
    if args.per_request < 1:
        parser.error("--per-request must be >= 1")
    client = Client(args.url, os.environ.get(args.token_env))
    try:
        for start in range(0, len(args.images), args.per_request):
            print(format_predictions(client.predict(args.images[start:start + args.per_request], args.top_k)))
    except (EndpointError, requests.RequestException, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A read-only container registry for tests: serves images saved from the local Docker engine
over the part of the Registry HTTP API V2 that a pull uses (`/v2/`, manifests, blobs), so the
engine can pull from `127.0.0.1:<port>` (loopback registries may speak plain HTTP).

The engine here has no registry and no network; this lets a test watch an agent pull an
image it does not have, with the engine's own pull code doing the work.
"""

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def saved_image(image):
    """The config and layers of `image` as `docker save` writes them (the classic layout)."""
    saved = subprocess.run(["docker", "save", image], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(saved)) as tar:
        [entry] = json.load(tar.extractfile("manifest.json"))
        config = tar.extractfile(entry["Config"]).read()
        layers = [tar.extractfile(path).read() for path in entry["Layers"]]
    return config, layers


class Registry:
    """Serves the images given to `add` until `close`; `pulled` lists the image name of each
    manifest request (an engine that already has the layers may only ask for the digest)."""

    def __init__(self):
        self.manifests = {}
        self.blobs = {}
        self.pulled = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(send_body=False)

            def do_GET(self):
                self.answer(send_body=True)

            def answer(self, send_body):
                path = self.path.split("?")[0]
                if path in ("/v2", "/v2/"):
                    return self.send(200, "application/json", b"{}", send_body)
                # /v2/<name>/manifests/<tag> and /v2/<name>/blobs/<digest>; names hold slashes.
                head, _, reference = path[len("/v2/"):].rpartition("/")
                name, _, kind = head.rpartition("/")
                if kind == "manifests" and (name, reference) in registry.manifests:
                    body = registry.manifests[(name, reference)]
                    registry.pulled.append(name)
                    return self.send(200, MANIFEST_TYPE, body, send_body, digest(body))
                if kind == "blobs" and reference in registry.blobs:
                    return self.send(200, "application/octet-stream", registry.blobs[reference],
                                     send_body, reference)
                return self.send(404, "application/json",
                                 json.dumps({"errors": [{"code": "NAME_UNKNOWN"}]}).encode(), send_body)

            def send(self, status, content_type, body, send_body, content_digest=None):
                self.send_response(status)
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if content_digest:
                    self.send_header("Docker-Content-Digest", content_digest)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, local_image, name, tag):
        """Serves `local_image` (an image the engine has) as `<address>/<name>:<tag>`."""
        config, layers = saved_image(local_image)
        self.blobs[digest(config)] = config
        described = []
        for layer in layers:
            # mtime 0: the same layer compresses to the same blob every time.
            packed = gzip.compress(layer, mtime=0)
            self.blobs[digest(packed)] = packed
            described.append({"mediaType": LAYER_TYPE, "size": len(packed), "digest": digest(packed)})
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "size": len(config), "digest": digest(config)},
            "layers": described,
        }
        body = json.dumps(manifest).encode()
        # By tag, and by the digest the engine asks for once the tag told it.
        self.manifests[(name, tag)] = body
        self.manifests[(name, digest(body))] = body
        return f"{self.address}/{name}:{tag}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

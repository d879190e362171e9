#!/usr/bin/env python3
"""A stand-in for Harbor's v2.0 API (the three list calls lazypull's GET /images makes),
answering the JSON Harbor documents, with its pagination (page, page_size, X-Total-Count),
Basic auth, and a repository name with a slash encoded twice in the path, as Harbor wants.
Usage: harbor_standin.py PORT USER PASSWORD"""
import base64, json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, parse_qs

PORT, USER, PASSWORD = int(sys.argv[1]), sys.argv[2], sys.argv[3]
PROJECTS = [{"project_id": 1, "name": "library", "repo_count": 2},
            {"project_id": 2, "name": "empty", "repo_count": 0}]
REPOS = {"library": [{"id": 1, "name": "library/nginx", "artifact_count": 2},
                     {"id": 2, "name": "library/team/app", "artifact_count": 1}],
         "empty": []}
ARTIFACTS = {
    ("library", "nginx"): [
        {"id": 1, "digest": "sha256:" + "a" * 64, "size": 67108864, "type": "IMAGE",
         "tags": [{"id": 1, "name": "latest"}, {"id": 2, "name": "1.25"}]},
        {"id": 2, "digest": "sha256:" + "b" * 64, "size": 1000, "type": "IMAGE", "tags": None},
    ],
    ("library", "team%252Fapp"): [
        {"id": 3, "digest": "sha256:" + "c" * 64, "size": 2210000000, "type": "IMAGE",
         "tags": [{"id": 3, "name": "v2"}]},
    ],
}


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def send_json(self, code, body, total=None):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if total is not None:
            self.send_header("X-Total-Count", str(total))
        self.end_headers()
        self.wfile.write(data)

    def page(self, items, q):
        page = int(q.get("page", ["1"])[0])
        size = int(q.get("page_size", ["10"])[0])
        self.send_json(200, items[(page - 1) * size: page * size], total=len(items))

    def do_GET(self):
        want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if self.headers.get("Authorization") != want:
            return self.send_json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "unauthorized"}]})
        u = urlsplit(self.path)
        q = parse_qs(u.query)
        parts = u.path.split("/")  # raw: percent-encoding kept
        if u.path == "/api/v2.0/projects":
            return self.page(PROJECTS, q)
        if len(parts) == 6 and parts[:4] == ["", "api", "v2.0", "projects"] and parts[5] == "repositories":
            return self.page(REPOS.get(parts[4], []), q)
        if (len(parts) == 8 and parts[:4] == ["", "api", "v2.0", "projects"]
                and parts[5] == "repositories" and parts[7] == "artifacts"):
            key = (parts[4], parts[6])
            if key not in ARTIFACTS:
                return self.send_json(404, {"errors": [{"code": "NOT_FOUND", "message": "repository not found"}]})
            if q.get("with_tag") != ["true"]:
                return self.send_json(400, {"errors": [{"code": "BAD_REQUEST", "message": "with_tag"}]})
            return self.page(ARTIFACTS[key], q)
        self.send_json(404, {"errors": [{"code": "NOT_FOUND", "message": self.path}]})


ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()

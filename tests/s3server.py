"""An S3-compatible server for the tests: moto's S3 in server mode, in a
process of its own, on 127.0.0.1 (``python tests/s3server.py PORT``).

One route is added in front of moto's, for what no S3 API can do:
``POST /_test/rot?bucket=B&key=K&offset=N`` flips one byte of the stored
object at offset N and keeps its ETag and checksums, as bit rot on the
store's disks would: the server then sends bytes that its own claims do
not describe (breaking it at the server, not in the client).
"""

from __future__ import annotations

import sys
import urllib.parse

from moto.moto_server.werkzeug_app import create_backend_app
from moto.s3.models import s3_backends
from werkzeug.serving import make_server

ACCOUNT = "123456789012"  # moto's default account


def rot(query: dict[str, list[str]]) -> str:
    bucket = s3_backends[ACCOUNT]["aws"].get_bucket(query["bucket"][0])
    key = bucket.keys[query["key"][0]]
    etag = key.etag  # computed from the bytes the first time: keep it
    offset = int(query["offset"][0])
    value = bytearray(key.value)
    value[offset] ^= 1
    key.value = bytes(value)
    key._etag = etag.strip('"')
    return f"{etag} kept, byte {offset} flipped\n"


def main() -> None:
    moto = create_backend_app("s3")  # S3 only: unsigned GETs are S3 too

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/_test/rot":
            text = rot(urllib.parse.parse_qs(environ.get("QUERY_STRING", "")))
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [text.encode()]
        return moto(environ, start_response)

    server = make_server("127.0.0.1", int(sys.argv[1]), app, threaded=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

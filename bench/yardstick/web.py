"""The Flask app: md5-light's /submit and /check contract over Celery.

POST /submit (form ``url``) answers 202 ``{"id": ...}`` at once via
``delay``; GET /check?id= answers 202 running, 200 done (md5, url), 502
failed, 404 for an id it never gave. Celery's result backend cannot tell
an unknown id from a queued task (both are PENDING), so the submit keeps
the task's url in Redis, which also lets /check return it.
"""

from __future__ import annotations

import redis
from celery.result import AsyncResult
from flask import Flask, jsonify, request

from bench.yardstick.tasks import REDIS_URL, celery, md5_of_url

app = Flask(__name__)
store = redis.Redis.from_url(REDIS_URL, decode_responses=True)
URL_TTL = 24 * 3600


@app.post("/submit")
def submit():
    url = request.form.get("url", "").strip()
    if not url.startswith(("http://", "https://")):
        return jsonify(error="url must be an http or https URL"), 400
    result = md5_of_url.delay(url)
    store.set(f"yardstick:url:{result.id}", url, ex=URL_TTL)
    return jsonify(id=result.id), 202, {"Location": f"/check?id={result.id}"}


@app.get("/check")
def check():
    task_id = request.args.get("id")
    if not task_id:
        return jsonify(error="id is required"), 400
    url = store.get(f"yardstick:url:{task_id}")
    if url is None:
        return jsonify(status="not_found"), 404
    result = AsyncResult(task_id, app=celery)
    if result.successful():
        return jsonify(md5=result.result, status="done", url=url), 200
    if result.failed():
        return jsonify(error=str(result.result), status="failed", url=url), 502
    return jsonify(status="running"), 202, {"Retry-After": "1"}

"""The Celery side of the side-by-side benchmark: the submitter's job as a Celery task.

Started by sidebyside.py as
    python3 -m celery -A sbs_celery worker --pool threads --concurrency C ...
with its settings in the SBS_* environment variables below.  The task does what
`integration-worker submitter` does for a job that the provider accepts:

  1. validate the job against schemas/submission-job.schema.json (jsonschema,
     draft 7, compiled once);
  2. POST /api/v1/external-resource to the mock provider with the contract's
     outbound body, X-API-Key/X-API-Secret and Idempotency-Key (the jobKey);
  3. publish submission.accepted to the <ns>.events topic exchange, persistent,
     correlation_id = jobKey, and wait for the publisher confirm;
  4. return, after which Celery acks the delivery (task_acks_late).

It does not do what the C submitter also does per job (a permit from the shared
rate limiter and the accepted-job record in Redis, the first status check
published to the delay tiers): the Celery side does less work per job.

Settings (every one stated here and in the README):
  broker_url                  amqp://guest:guest@127.0.0.1:5672// (py-amqp)
  task_acks_late              True: ack after the task returned (the event is
                              confirmed by then), as the C worker acks after confirm
  worker_prefetch_multiplier  1: prefetch = concurrency, one message per thread
  --pool threads --concurrency C   C = the C worker's IW_CONCURRENCY
  task_ignore_result          True, no result backend (the C worker has none)
  worker_send_task_events     False; worker_enable_remote_control False;
                              --without-gossip --without-mingle
                              --without-heartbeat (no cluster chatter)
  task queue                  <ns>.celery, durable quorum queue (as the C
                              worker's <ns>.submit), direct exchange <ns>.celery
  QoS                         per consumer (basic.qos global=False): RabbitMQ's
                              quorum queues refuse global QoS, which Celery 5.2
                              asks for; Celery 5.5 does the same with
                              worker_detect_quorum_queues
  celery/celery#6941          the tick workaround (SBS_CELERY_WAKE, below)

The #6941 tick: with a threads pool the worker's event loop (kombu's Hub) runs in
the main thread and a task's late ack is handed to it with hub.call_soon() from
the pool thread.  Nothing wakes the hub's poll() for that, so the ack (and with
prefetch 1 the next delivery) waits for the next poll timeout: up to one second
when no timer is due.  SBS_CELERY_WAKE selects the workaround:
  pipe (default)  call_soon from a pool thread also writes a byte to a pipe that
                  the hub polls, so the ack is sent at once and idle costs nothing
  tick:MS         a repeating hub timer every MS milliseconds bounds the wait
  none            Celery as shipped (to see the stall)

Connections: each pool thread borrows one HTTP keep-alive connection and one AMQP
connection (confirm mode) from a pool made before the worker is ready, so no
connection is opened inside the measured window; py-amqp and http.client
connections are not thread-safe, hence one per thread.
"""
import datetime
import hashlib
import http.client
import json
import os
import queue
import threading

import amqp
import jsonschema
from celery import Celery, bootsteps, signals
from kombu import Exchange, Queue
from kombu.transport import pyamqp

NS = os.environ.get("SBS_NAMESPACE", "t-sbs")
PROVIDER_PORT = int(os.environ.get("SBS_PROVIDER_PORT", "8080"))
CONCURRENCY = int(os.environ.get("SBS_CONCURRENCY", "64"))
WAKE = os.environ.get("SBS_CELERY_WAKE", "pipe")
SCHEMA = os.environ.get("SBS_SCHEMA", "schemas/submission-job.schema.json")
API_KEY = os.environ.get("SBS_API_KEY", "test-key-xxxxx")
API_SECRET = os.environ.get("SBS_API_SECRET", "test-secret-xxxxx")
CLIENT_ID = "integration-worker"
QUEUE = NS + ".celery"
EVENTS = NS + ".events"

app = Celery("sbs_celery")
app.conf.update(
    broker_url="amqp://guest:guest@127.0.0.1:5672//",
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    result_backend=None,
    worker_send_task_events=False,
    worker_enable_remote_control=False,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    task_queues=[
        Queue(QUEUE, Exchange(QUEUE, "direct", durable=True), routing_key=QUEUE,
              durable=True, queue_arguments={"x-queue-type": "quorum"})
    ],
    broker_connection_retry_on_startup=True,
)

# Quorum queues refuse global QoS; with a single consumer per-consumer QoS is the
# same limit (prefetch = concurrency x multiplier).
pyamqp.Transport.qos_semantics_matches_spec = lambda self, connection: True

with open(SCHEMA, encoding="utf-8") as f:
    _validator = jsonschema.Draft7Validator(json.load(f))


class _Link:
    """One pool thread's connections: HTTP keep-alive to the provider and an
    AMQP channel in confirm mode (py-amqp waits for the confirm in basic_publish)."""

    def __init__(self):
        self.http = http.client.HTTPConnection("127.0.0.1", PROVIDER_PORT, timeout=30)
        # confirm_publish=True makes basic_publish select confirm mode on first use
        # and wait for each publish's basic.ack (a nack raises MessageNacked);
        # calling channel.confirm_select() alone would not make it wait.
        self.amqp = amqp.Connection(host="127.0.0.1:5672", userid="guest", password="guest",
                                    virtual_host="/", confirm_publish=True)
        self.amqp.connect()
        self.channel = self.amqp.channel()

    def post(self, path, body, headers):
        try:
            self.http.request("POST", path, body=body, headers=headers)
            resp = self.http.getresponse()
        except (http.client.HTTPException, OSError):
            # A dropped keep-alive connection: one fresh try, as curl would.
            self.http.close()
            self.http.request("POST", path, body=body, headers=headers)
            resp = self.http.getresponse()
        return resp.status, resp.read()


_links = queue.LifoQueue()


@signals.worker_ready.connect
def _open_links(**_):
    for _ in range(CONCURRENCY):
        _links.put(_Link())


def job_key(job_id):
    """The contract's jobKey: the jobId when it is at most 255 bytes of printable
    ASCII, otherwise sha256: and the hex digest of its UTF-8 bytes."""
    raw = job_id.encode("utf-8")
    if len(raw) <= 255 and all(0x21 <= b <= 0x7E for b in raw):
        return job_id
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


@app.task(name="sbs.submit")
def submit(job):
    _validator.validate(job)  # raises ValidationError: the task fails (and is acked)
    key = job_key(job["jobId"])
    body = json.dumps({
        "user_id": job["userId"],
        "action_type": job["action"],
        "request_data": job["payload"],
        "client_info": {"client_id": CLIENT_ID, "timestamp": _now()},
    }, separators=(",", ":"))
    headers = {"Content-Type": "application/json", "X-API-Key": API_KEY,
               "X-API-Secret": API_SECRET, "Idempotency-Key": key}
    link = _links.get()
    try:
        status, raw = link.post("/api/v1/external-resource", body, headers)
        if status == 201:
            answer = json.loads(raw)
            rk = "submission.accepted"
            event = {"jobId": job["jobId"], "externalId": answer.get("id"),
                     "trackingId": answer.get("trackingId"), "status": answer.get("status"),
                     "acceptedAt": _now()}
        else:
            rk = "submission.failed"
            event = {"jobId": job["jobId"],
                     "error": {"code": "EXTERNAL_API_ERROR", "message": raw[:200].decode(
                         "utf-8", "replace"), "statusCode": status, "retryAttempt": 1}}
        msg = amqp.Message(json.dumps(event, separators=(",", ":")),
                           content_type="application/json", delivery_mode=2, correlation_id=key)
        link.channel.basic_publish(msg, exchange=EVENTS, routing_key=rk)  # waits for the confirm
    finally:
        _links.put(link)


class WakeHub(bootsteps.StartStopStep):
    """The celery/celery#6941 workaround (see the module comment)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c):
        hub = c.hub
        if hub is None or WAKE == "none":
            return
        if WAKE.startswith("tick:"):
            hub.call_repeatedly(float(WAKE[5:]) / 1000.0, lambda: None)
            return
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        main = threading.get_ident()

        def drain():
            try:
                os.read(rfd, 65536)
            except BlockingIOError:
                pass

        hub.add_reader(rfd, drain)
        orig = c.call_soon

        def call_soon(p, *args, **kwargs):
            res = orig(p, *args, **kwargs)
            if threading.get_ident() != main:
                try:
                    os.write(wfd, b"x")
                except BlockingIOError:
                    pass  # the pipe is full: the hub is already due to wake
            return res

        c.call_soon = call_soon


app.steps["consumer"].add(WakeHub)

"""The site's long-lived ClientApp executor: fedsilo's installed code, the model kept loaded.

In subprocess isolation Flower 1.42 starts a new ``flwr-clientapp`` process for every message,
which installs the bundle the server shipped and imports the app from it: ~9 s of imports and a
model reload per message, and code chosen by the server. A fedsilo site instead runs its
SuperNode with ``--isolation process`` and serves the SuperNode's Runtime API (loopback only)
from this worker: it takes each task, checks the run's bundle hash against the site policy,
checks the message size and the adapter shape against the policy, and answers with the
installed :func:`fedsilo.client.app.build_client_app`, in this process, with the model that is
already in memory. The bundle itself is never executed (Flower's SuperNode reads its
``pyproject.toml``; this worker only hashes it).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedsilo.client.policy import TaskRefusedError, check_bundle, check_lora, check_task
from fedsilo.deploy.bundle import bundle_hash
from fedsilo.deploy.session_secrets import SessionSecrets
from fedsilo.deploy.site_model import DeployedSite
from fedsilo.deploy.site_pull import pull_task_input_bounded
from fedsilo.privacy.he.ckks import HeError
from fedsilo.privacy.secagg.messages import SecAggMessageError
from fedsilo.privacy.secagg.site import SecAggRefusedError
from fedsilo.protocol.records import LORA_KEY, TASK_KEY, LoraSpec, ProtocolError, RoundTask

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2
TASK_RETRIES = 3
TASK_RETRY_S = 10.0


@dataclass
class WorkerStats:
    """What the worker did, for the console and the benchmark."""

    tasks: int = 0
    refused: int = 0
    seconds: list[float] = field(default_factory=list)


def message_bytes(message: Message) -> int:
    """Bytes a message carries in its arrays, its config records (relayed shares, ciphertexts
    and advertisements travel there) and its metric records (lists of numbers): what loading
    it costs."""
    total = 0
    for record in message.content.array_records.values():
        for array in record.values():
            total += len(array.data)
    for records in (message.content.config_records, message.content.metric_records):
        for values in records.values():
            for value in values.values():
                total += sum(map(_value_bytes, value if isinstance(value, list) else [value]))
    return total


def _value_bytes(value: object) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    return len(value) if isinstance(value, bytes) else 8  # numbers and flags


# The errors fedsilo raises on purpose to refuse a request: their texts are written to be sent
# and say what was refused and why, in terms of the request and the site's policy.
DELIBERATE_REFUSALS: tuple[type[Exception], ...] = (
    TaskRefusedError,
    ProtocolError,
    SecAggRefusedError,
    SecAggMessageError,
    HeError,
)


def reason_for_coordinator(error: Exception) -> str:
    """What the coordinator is told of ``error``: a deliberate refusal's whole text; of any
    other failure only its type, since its text may quote the site's data, paths or numbers
    (the site's log has it)."""
    if isinstance(error, DELIBERATE_REFUSALS):
        return f"{type(error).__name__}: {error}"
    return f"{type(error).__name__} (details in the site's log)"


class SiteWorker:
    """Serves one SuperNode's Runtime API with the installed fedsilo ClientApp."""

    def __init__(
        self,
        site: DeployedSite,
        app: ClientApp,
        *,
        runtime_address: str,
        stop: threading.Event,
        say: Callable[[str], None] = log.info,
    ) -> None:
        self.say = say
        self.site = site
        self.app = app
        self.runtime_address = runtime_address
        self.stop = stop
        self.stats = WorkerStats()
        self.secrets = SessionSecrets()

    def _client(self, token: str | None) -> RuntimeHttpClient:
        interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if token is not None:
            interceptors = [
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ]
        retry = make_simple_http_retry_invoker()
        # A SuperNode that died must not hold the worker: give up on it and let the site
        # restart it, instead of retrying forever.
        retry.max_tries, retry.max_time = TASK_RETRIES, TASK_RETRY_S
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,  # loopback only: the SuperNode's Runtime API binds 127.0.0.1
            root_certificates=None,
            interceptors=interceptors,  # type: ignore[arg-type]
            retry_invoker=retry,
        )

    def serve(self, *, alive: Callable[[], bool]) -> None:
        """Take and answer tasks until ``stop`` is set or ``alive()`` turns false."""
        acquirer = self._client(None)
        try:
            while not self.stop.is_set() and alive():
                try:
                    response = acquirer.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
                    )
                except Exception as error:  # the SuperNode may be restarting
                    log.debug("acquire failed: %s", error)
                    self.stop.wait(1.0)
                    continue
                if response.HasField("task") and response.token:
                    self._run_task(response.token)
                else:
                    self.stop.wait(POLL_INTERVAL_S)
        finally:
            acquirer.close()

    def _run_task(self, token: str) -> None:
        started = time.perf_counter()
        client = self._client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context = None
        status, details = "failed", "task failed"
        try:
            message, context, run, fab = pull_task_input_bounded(
                client,
                site=self.site.name,
                max_payload_bytes=self.site.policy.limits.max_payload_bytes,
            )
            kind = f"{message.metadata.message_type} (group {message.metadata.group_id})"
            self.say(f"task {kind} of run {run.run_id} received")
            reply = self._answer(message, context, bundle_sha256=bundle_hash(fab.content))
            push_message(client, reply, context)
            if reply.has_error():
                status, details = "failed", str(reply.error.reason)
                self.say(f"task {kind} refused: {details}")
            else:
                status, details = "completed", ""
                self.say(f"task {kind} answered in {time.perf_counter() - started:.2f} s")
        except Exception as error:  # report and keep serving: one bad task must not stop a site
            log.error("site %s: task failed: %s", self.site.name, error)
            details = reason_for_coordinator(error)
        finally:
            push_task_output(client, context, status, details)
            heartbeat.stop()
            client.close()
            self.stats.tasks += 1
            self.stats.seconds.append(time.perf_counter() - started)

    def _answer(self, message: Message, context: Context, *, bundle_sha256: str) -> Message:
        policy, name = self.site.policy, self.site.name
        try:
            check_bundle(policy, bundle_sha256, site=name)
            size = message_bytes(message)
            if size > policy.limits.max_payload_bytes:
                raise TaskRefusedError(
                    f"site {name}: the message carries {size} bytes; policy allows at most "
                    f"{policy.limits.max_payload_bytes}"
                )
            # Any message that carries a round task (train, or secure aggregation's masked
            # stage) gets the model prepared for it first.
            if TASK_KEY in message.content.config_records:
                self._prepare(message)
            with self.secrets.lent_to(context):
                return self.app(message=message, context=context)
        except Exception as error:  # refused or failed: the reason goes back as the reply
            self.stats.refused += isinstance(error, TaskRefusedError)
            log.warning("site %s: %s", name, error)
            if not isinstance(error, TaskRefusedError):
                log.debug("%s", traceback.format_exc())
            reason = reason_for_coordinator(error)
            error_reply = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            return Message(error_reply, reply_to=message)

    def _prepare(self, message: Message) -> None:
        content = message.content
        if TASK_KEY not in content.config_records:
            raise ProtocolError("the train message carries no round task")
        task = RoundTask.from_record(content.config_records[TASK_KEY])
        # The policy's own checks run again inside the app; here they guard the model load.
        check_task(self.site.policy, task, site=self.site.name)
        if LORA_KEY not in content.config_records:
            raise ProtocolError("the train message does not say which LoRA adapter to train")
        lora = LoraSpec.from_record(content.config_records[LORA_KEY])
        check_lora(self.site.policy, lora, site=self.site.name)
        self.site.prepare(lora, max_length=task.max_length)

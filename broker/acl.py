"""Least-privilege Redis users for corral: one per worker node, one for controllers.

``ACL SETUSER`` lines (or the same rules as lines of a Redis ACL file) that grant each role the
commands, keys and channels that Celery, kombu and corral use, and nothing else: no FLUSHALL,
CONFIG, KEYS, SHUTDOWN, MONITOR or DEBUG for anyone, and a worker writes only its own node's
liveness key and consumes only its own queue. Passwords are given as their SHA-256 (``#…``),
so the lines can be printed, logged and committed without the secret.

What the shared keys still allow (kombu and corral keep them in one place for all nodes): a
worker may write any field of ``corral:nodes``, ``corral:node-loads`` and ``corral:node-digests``
(another node's last-known info and load, not its liveness), the per-day usage counters,
any job's stream keys (a job can be delivered to any worker that serves its node), the
cluster's rate-limit counters (``corral:rate-counters``, which every worker counts its provider
calls in), and kombu's ``unacked`` set and bindings, which every consumer shares.
"""

from __future__ import annotations

import hashlib
import re

from broker import names
from broker.errors import ConfigError

# Commands every role needs: the connection handshake (redis-py sends HELLO-less AUTH, SELECT
# and CLIENT SETINFO), transactions, scripts, and the data commands below.
_CONNECTION = "+ping +select +auth +hello +client|setname +client|id +echo +quit +reset"
_TRANSACTIONS = "+multi +exec +discard +watch +unwatch"
_SCRIPTS = "+evalsha +eval +script|load +script|exists +time"
_PUBSUB = "+publish +subscribe +unsubscribe +psubscribe +punsubscribe"
_DATA = (
    "+get +set +del +exists +expire +pexpire +ttl +pttl +type"
    " +lpush +rpush +lpop +rpop +brpop +blpop +llen +lrange +lindex +lrem +ltrim"
    " +hset +hget +hgetall +hdel +hmget +hexists +hkeys +hlen +hincrby +hincrbyfloat"
    " +sadd +srem +smembers +sismember +scard"
    " +zadd +zrem +zrange +zrangebyscore +zrevrangebyscore +zcard +zscore"
)
_COMMANDS = " ".join((_CONNECTION, _TRANSACTIONS, _SCRIPTS, _PUBSUB, _DATA))

# kombu's own keys: bindings, the unacked set with its index and restore mutex.
_KOMBU_KEYS = "~_kombu.binding.* ~_kombu.binding_* ~unacked ~unacked_index ~unacked_mutex"
# Replies to Celery remote control (Flower's inspect): the asker's queue, which the worker fills.
_PIDBOX_REPLIES = "~*.reply.celery.pidbox*"


def _celery_channels(db: int) -> str:
    # Celery's broadcast (pidbox) and events travel on kombu fanout channels named
    # /<db>.<exchange>, which kombu PSUBSCRIBEs to; Redis admits a PSUBSCRIBE only to a pattern
    # the user's rules spell exactly, so the database number is part of the rule.
    return f"&/{db}.celery.pidbox &/{db}.celeryev/* &/{db}.celeryev"


_USER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")


def password_hash(password: str) -> str:
    """The form ``ACL SETUSER`` takes without the clear text: ``#`` + SHA-256 hex."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def worker_user(node: str) -> str:
    return f"corral-worker-{node}".lower()


CONTROLLER_USER = "corral-controller"


def worker_rules(node: str, db: int = 0) -> str:
    """What node ``node``'s worker may do: consume its own queue, heartbeat as itself,
    stream jobs, hear cancels."""
    return " ".join(
        (
            "resetkeys resetchannels -@all",
            _COMMANDS,
            # Its own queue's lists only (a pattern like corral.node.pi* would match pi2 too).
            " ".join(f"~{q}" for q in names.node_queue_lists(node)),
            _KOMBU_KEYS,
            _PIDBOX_REPLIES,
            # Its Celery remote-control (pidbox) queue: Flower inspects workers through it.
            f"~{node}@*.celery.pidbox ~{node}@*.celery.pidbox{names.PRIORITY_SEPARATOR}*",
            f"~{names.job_log_key('*')} ~{names.job_lease_key('*')}",
            f"~{names.job_result_key('*')} ~{names.job_cancel_key('*')}",
            f"%RW~{names.node_alive_key(node)} %W~{names.NODES_HASH}",
            # The heartbeat's load record and inventory digest (shared hashes, a field a node).
            f"~{names.NODE_LOADS_HASH} ~{names.NODE_DIGESTS_HASH}",
            # The per-day usage counters every finished job adds to (shared, a field a route).
            f"~{names.usage_day_key('*')}",
            # The cluster's shared rate-limit counters; its own backends' provider headers.
            f"~{names.RATE_COUNTERS_HASH} ~{names.provider_limits_key(node, '*')}",
            f"&{names.job_channel('*')} &{names.CANCEL_CHANNEL}",
            _celery_channels(db),
        )
    )


def controller_rules(db: int = 0) -> str:
    """What a controller (CLI, gateway, MCP server) may do: read the cluster, route, send to
    any node's queue, follow, move and cancel jobs, keep breakers and sessions."""
    return " ".join(
        (
            "resetkeys resetchannels -@all",
            _COMMANDS,
            f"~{names.NODE_QUEUE_PREFIX}*",
            _KOMBU_KEYS,
            f"~{names.KEY_PREFIX}*",
            _PIDBOX_REPLIES,
            "~celeryev.*",  # Flower's own event queue
            f"&{names.job_channel('*')} &{names.CANCEL_CHANNEL}",
            _celery_channels(db),
        )
    )


SEPARATOR = names.PRIORITY_SEPARATOR
SEPARATOR_ESCAPED = "".join(f"\\x{ord(c):02x}" for c in SEPARATOR)


def setuser_args(user: str, password: str, rules: str) -> list[str]:
    """The command, argument by argument, as a client sends it."""
    if not _USER_NAME.match(user):
        raise ConfigError(f"{user!r} is not a usable Redis user name (letters, digits, . _ -)")
    return ["ACL", "SETUSER", user, "reset", "on", password_hash(password), *rules.split(" ")]


def setuser_line(user: str, password: str, rules: str) -> str:
    """The command as one line for redis-cli, each argument double-quoted."""
    return " ".join(_quoted(arg) for arg in setuser_args(user, password, rules))


# The broker's own administrator: Redis's ``default`` user, which replicas (``masterauth``),
# Sentinel and the operator's redis-cli use. An ACL file replaces ``requirepass``, so without
# this line the default user would be left without a password.
ADMIN_USER = "default"
ADMIN_RULES = "~* &* +@all"


def aclfile_line(user: str, password: str, rules: str) -> str:
    """The same user as a line of a Redis ACL file (``aclfile``): ``user NAME reset on #hash …``.

    Redis splits a line of that file on spaces alone (no quotes, no escapes), so the kombu
    priority separator in queue names is written as its raw bytes."""
    if not _USER_NAME.match(user):
        raise ConfigError(f"{user!r} is not a usable Redis user name (letters, digits, . _ -)")
    return " ".join(("user", user, "reset", "on", password_hash(password), *rules.split(" ")))


def _quoted(arg: str) -> str:
    return '"' + arg.replace(SEPARATOR, SEPARATOR_ESCAPED) + '"'

"""``[sandbox]`` (each kernel's limits), ``[server]`` (each researcher's Jupyter server) and ``[audit]``."""

from __future__ import annotations

from paitient.config.model import Model
from paitient.config.traits import POSITIVE, Rule, WholeNumber, at_least


class Sandbox(Model):
    """Limits of each researcher kernel, enforced outside the kernel as resource limits of its sandbox."""

    section = "sandbox"

    memory_mb = WholeNumber(4096, rule=POSITIVE, help="Private memory a kernel may allocate (RLIMIT_DATA), MiB.")
    max_processes = WholeNumber(
        256, rule=POSITIVE, help="Processes and threads of the user inside one sandbox (RLIMIT_NPROC)."
    )
    max_open_files = WholeNumber(1024, rule=POSITIVE, help="Open files per kernel process (RLIMIT_NOFILE).")

    cpu_seconds = WholeNumber(
        0,
        rule=Rule("be 0 (no limit) or a positive number of seconds", lambda v: v >= 0),
        help="CPU seconds per kernel process (RLIMIT_CPU); 0: no limit.",
    )

    tmp_bytes = WholeNumber(
        1 << 30,
        rule=at_least(1 << 20),
        help="Size of a kernel's private /tmp and of its /dev/shm, each, in bytes (a write past it fails with "
        "ENOSPC). Their memory is charged to no process, so it comes on top of memory_mb. At least 1 MiB.",
    )
    kernels_per_account = WholeNumber(
        8,
        rule=POSITIVE,
        help="Kernels one account may run at once; the launcher refuses the next, saying how many run and how "
        "to end one. With memory_mb it bounds the memory one researcher's kernels can hold (8 x 4096 MiB by "
        "default), so one account opening notebook after notebook cannot push the others' kernels out of memory.",
    )
    kernel_log_bytes = WholeNumber(
        1 << 20,
        rule=at_least(4096),
        help="Bytes of one kernel's stdout and stderr kept in <state_dir>/logs/kernels-<account>.log (the first "
        "ones: a crash's traceback at start); the rest is read and dropped, and a line says how much. An "
        "account's file is moved to .log.1 (replacing the last) when a kernel starts and it holds 16 times this. "
        "At least 4096.",
    )


class Server(Model):
    """Each researcher's Jupyter server."""

    section = "server"

    output_cap_message_bytes = WholeNumber(
        1_000_000,
        rule=POSITIVE,
        help="Output one kernel message may carry to the browser before it is cut, with a visible notice where "
        "it was cut. The cap is applied by the server, outside the kernel.",
    )
    output_cap_execution_bytes = WholeNumber(
        5_000_000,
        rule=POSITIVE,
        help="Output the messages of one cell execution may carry to the browser in total before the rest is cut.",
    )
    contents_cap_bytes = WholeNumber(
        20_000_000,
        rule=POSITIVE,
        help="The contents API does not open or send files larger than this; they stay in the home (take results "
        "out through the airlock). Bounds what a file dump through the file browser can carry.",
    )

    idle_timeout = WholeNumber(
        3600,
        rule=Rule("be 0 (never) or a number of seconds", lambda v: v >= 0),
        help="Seconds after which an idle kernel is shut down (its memory and any privacy-budget reservation "
        "freed), and then a server with no kernels and no activity stops itself. 0: never.",
    )

    cull_timeout = WholeNumber(
        7200,
        rule=Rule("be 0 (off) or at least 60 seconds", lambda v: v == 0 or v >= 60),
        help="Seconds a researcher's server may go without activity as the hub sees it (requests through the proxy, "
        "the server's own activity reports) before the hub stops it; its kernels end with it, the home stays, and "
        "the next visit starts it again. The hub's idle culler does this, a service the hub runs whose role may "
        "only list users, read their activity and servers, and stop servers. It stops servers that do not stop "
        "themselves after idle_timeout, such as one that hangs. An open JupyterLab tab polls the server and counts "
        "as activity. 0: no culler runs.",
    )


class Audit(Model):
    """The audit trail: hash-chained JSON lines under <state_dir>/audit (root only, mode 0750).

    Written by the hub and the services; users' servers and kernels report through the audit service's socket,
    which names them by their uid. `paitient audit verify` checks the chain, `paitient audit show` reads it.
    """

    section = "audit"

    rotate_bytes = WholeNumber(
        64 << 20,
        rule=at_least(4096),
        help="A new trail file begins when the current one reaches this many bytes; its first record carries the "
        "last hash of the file before, so the chain runs across files. At least 4096.",
    )

    user_string_chars = WholeNumber(
        65536,
        rule=at_least(64),
        help="Strings in events from users' servers and kernels (e.g. a cell's code) are kept up to this many "
        "characters; a longer one is recorded cut, with its full length and SHA-256. At least 64.",
    )

    user_details_bytes = WholeNumber(
        262144,
        rule=at_least(1024),
        help="Details of one event from a user's server larger than this many bytes (as JSON) are replaced by their "
        "length and SHA-256. It holds a cell's code (the server sends up to 200,000 characters of it, cut to "
        "user_string_chars here). At least 1024.",
    )

    kernel_details_bytes = WholeNumber(
        4096,
        rule=at_least(1024),
        help="The same, for an event sent from inside a kernel (or a sender whose origin cannot be told): the "
        "workspace's kernels report nothing themselves (the user's server records cells and kernel starts), so "
        "a kernel has no need for large details. At least 1024.",
    )

    user_daily_bytes = WholeNumber(
        64 << 20,
        rule=at_least(1 << 20),
        help="Bytes of details one account's server and kernels may have recorded in the last 24 hours (counted in "
        "hourly steps; kept across restarts of the audit service in <state_dir>/audit-budget.json). Past it an "
        "event is still recorded (actor, action, object, outcome, time), with its details replaced by their length "
        "and SHA-256, and an audit.budget record (at most one an hour per account) says the budget was reached. "
        "A cell is never refused for it. Records of the hub and the services are never cut. At least 1 MiB.",
    )

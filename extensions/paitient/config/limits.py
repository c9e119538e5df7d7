"""``[sandbox]`` (each kernel's limits), ``[server]`` (each researcher's Jupyter server) and ``[audit]``."""

from __future__ import annotations

from traitlets import Bunch, validate

from paitient.config.errors import must
from paitient.config.model import Model
from paitient.config.traits import WholeNumber


class Sandbox(Model):
    """Limits of each researcher kernel, enforced outside the kernel as resource limits of its sandbox."""

    section = "sandbox"

    memory_mb = WholeNumber(4096, help="Private memory a kernel may allocate (RLIMIT_DATA), MiB.").tag(config=True)
    max_processes = WholeNumber(256, help="Processes and threads of the user inside one sandbox (RLIMIT_NPROC).").tag(
        config=True
    )
    max_open_files = WholeNumber(1024, help="Open files per kernel process (RLIMIT_NOFILE).").tag(config=True)

    @validate("memory_mb", "max_processes", "max_open_files")
    def _positive(self, proposal: Bunch) -> int:
        must(proposal.value > 0, "be a positive whole number", proposal.value)
        return proposal.value

    cpu_seconds = WholeNumber(0, help="CPU seconds per kernel process (RLIMIT_CPU); 0: no limit.").tag(config=True)

    @validate("cpu_seconds")
    def _cpu_seconds(self, proposal: Bunch) -> int:
        must(proposal.value >= 0, "be 0 (no limit) or a positive number of seconds", proposal.value)
        return proposal.value


class Server(Model):
    """Each researcher's Jupyter server."""

    section = "server"

    output_cap_message_bytes = WholeNumber(
        1_000_000,
        help="Output one kernel message may carry to the browser before it is cut, with a visible notice where "
        "it was cut. The cap is applied by the server, outside the kernel.",
    ).tag(config=True)
    output_cap_execution_bytes = WholeNumber(
        5_000_000,
        help="Output the messages of one cell execution may carry to the browser in total before the rest is cut.",
    ).tag(config=True)
    contents_cap_bytes = WholeNumber(
        20_000_000,
        help="The contents API does not open or send files larger than this; they stay in the home (take results "
        "out through the airlock). Bounds what a file dump through the file browser can carry.",
    ).tag(config=True)

    @validate("output_cap_message_bytes", "output_cap_execution_bytes", "contents_cap_bytes")
    def _positive(self, proposal: Bunch) -> int:
        must(proposal.value > 0, "be a positive whole number", proposal.value)
        return proposal.value

    idle_timeout = WholeNumber(
        3600,
        help="Seconds after which an idle kernel is shut down (its memory and any privacy-budget reservation "
        "freed), and then a server with no kernels and no activity stops itself. 0: never.",
    ).tag(config=True)

    @validate("idle_timeout")
    def _idle_timeout(self, proposal: Bunch) -> int:
        must(proposal.value >= 0, "be 0 (never) or a number of seconds", proposal.value)
        return proposal.value


class Audit(Model):
    """The audit trail: hash-chained JSON lines under <state_dir>/audit (root only, mode 0750).

    Written by the hub and the services; users' servers and kernels report through the audit service's socket,
    which names them by their uid. `paitient audit verify` checks the chain, `paitient audit show` reads it.
    """

    section = "audit"

    rotate_bytes = WholeNumber(
        64 << 20,
        help="A new trail file begins when the current one reaches this many bytes; its first record carries the "
        "last hash of the file before, so the chain runs across files. At least 4096.",
    ).tag(config=True)

    @validate("rotate_bytes")
    def _rotate_bytes(self, proposal: Bunch) -> int:
        must(proposal.value >= 4096, "be at least 4096", proposal.value)
        return proposal.value

    user_string_chars = WholeNumber(
        65536,
        help="Strings in events from users' servers and kernels (e.g. a cell's code) are kept up to this many "
        "characters; a longer one is recorded cut, with its full length and SHA-256. At least 64.",
    ).tag(config=True)

    @validate("user_string_chars")
    def _user_string_chars(self, proposal: Bunch) -> int:
        must(proposal.value >= 64, "be at least 64", proposal.value)
        return proposal.value

    user_details_bytes = WholeNumber(
        262144,
        help="Details of one user-side event larger than this many bytes (as JSON) are replaced by their length "
        "and SHA-256. At least 1024.",
    ).tag(config=True)

    @validate("user_details_bytes")
    def _user_details_bytes(self, proposal: Bunch) -> int:
        must(proposal.value >= 1024, "be at least 1024", proposal.value)
        return proposal.value

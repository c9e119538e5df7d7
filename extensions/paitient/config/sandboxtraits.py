"""The kernel sandbox's limits and tools as traits of a configurable, declared once for the two places that
build a sandbox: the user's server (:class:`paitient.server.provisioner.SandboxProvisioner`, when no launcher
builds it) and the launcher of a user's pod (:class:`paitient.services.launcher.pod.PodLauncherApp`). The
limits mirror the site's ``[sandbox]`` settings (:func:`~paitient.config.traits.site_trait`): same type,
default, help and rule."""

from __future__ import annotations

from traitlets import Unicode

from paitient.config.limits import Sandbox
from paitient.config.traits import SiteTrait, site_trait


def sandbox_traits() -> tuple[SiteTrait, SiteTrait, SiteTrait, SiteTrait, SiteTrait, Unicode, Unicode]:
    """``memory_mb, max_processes, max_open_files, cpu_seconds, tmp_bytes, bwrap_path, prlimit_path``, new
    traits each call, for a class body::

        memory_mb, max_processes, max_open_files, cpu_seconds, tmp_bytes, bwrap_path, prlimit_path = (
            sandbox_traits()
        )
    """
    return (
        site_trait(Sandbox, "memory_mb"),
        site_trait(Sandbox, "max_processes"),
        site_trait(Sandbox, "max_open_files"),
        site_trait(Sandbox, "cpu_seconds"),
        site_trait(Sandbox, "tmp_bytes"),
        Unicode("/usr/bin/bwrap", help="The bubblewrap binary.").tag(config=True),
        Unicode("/usr/bin/prlimit", help="util-linux prlimit, sets the rlimits.").tag(config=True),
    )

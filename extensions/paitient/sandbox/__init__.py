"""paitient.sandbox: every kernel in a bubblewrap sandbox.

- :mod:`~paitient.sandbox.policy`: what a kernel sees, and the ``bwrap``/``prlimit`` command lines (pure).
- :mod:`~paitient.sandbox.seccomp`: the seccomp filter handed to bwrap (pure).
- :mod:`~paitient.sandbox.provisioner`: ``paitient-sandbox``, the kernel provisioner (entry point in
  ``jupyter_client.kernel_provisioners``) that applies them inside the user's server.

What a kernel gets: no network (only ``lo`` of its own namespace; ZMQ over ipc sockets), its own pid, ipc,
uts, cgroup and user namespaces with nested user namespaces disabled, no capabilities, no new privileges,
a new session, death with its parent; a read-only system, a minimal /etc, private /proc, /dev and /tmp,
the home read-write, each dataset of the user's projects read-only at /data/<project>/<dataset>, the
service sockets at their host path; an environment of eight variables; rlimits on private memory,
processes, open files and CPU time.
"""

"""Zone ``paitient.rules``: pure rules, no I/O.

Importable from every zone and unit-tested without processes: budget arithmetic (:mod:`.budget`),
disclosure rules (:mod:`.disclosure`), the review state machine (:mod:`.review`), pseudonyms and date
shifts (:mod:`.pseudonyms`), the sandbox's command lines (:mod:`.sandbox`, :mod:`.seccomp`), the output
cap (:mod:`.outputcap`) and the train/holdout split (:mod:`.split`).

Trusted for: the same answer wherever it runs. A rule run in the kernel is advice; the same rule run
root-side decides.
"""

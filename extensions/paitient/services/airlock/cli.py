"""``paitient airlock``: list airlock requests and their state (root; reads the service's store)."""

from __future__ import annotations

import json
import time

from traitlets import Bool, Unicode

from paitient.app import PaitientCommand
from paitient.rules import review
from paitient.services.airlock.store import Store, StoreError


class AirlockCommand(PaitientCommand):
    name = "airlock"
    description = "List airlock requests and their state; `paitient airlock ID` shows one with its history."
    project = Unicode("", help="Only requests of this project.").tag(config=True)
    state = Unicode("", help="Only requests in this state: " + ", ".join(review.STATES)).tag(config=True)
    as_json = Bool(False, help="Print JSON instead of a table.").tag(config=True)
    aliases = {**PaitientCommand.aliases, "project": "AirlockCommand.project", "state": "AirlockCommand.state"}
    flags = {"json": ({"AirlockCommand": {"as_json": True}}, "Print JSON.")}

    def start(self) -> None:
        self.require_root()
        site = self.load_site()
        if self.state and self.state not in review.STATES:
            self.fail(f"--state must be one of {', '.join(review.STATES)}")
        if not (site.state_dir / "airlock" / "blobs").is_dir():
            self.fail(f"no airlock store under {site.state_dir}; has the airlock service run there?")
        store = Store.for_site(site)
        if self.extra_args:
            try:
                req = store.get(self.extra_args[0])
            except StoreError as e:
                self.fail(str(e))
            events = [{"ts": e.ts, "actor": e.actor, "type": e.type, **e.data} for e in store.events(req.id)]
            print(json.dumps({**req.public(), "events": events}, indent=2, default=str))
            return
        reqs = store.list(
            projects=[self.project] if self.project else None, states_=[self.state] if self.state else None
        )
        if self.as_json:
            print(json.dumps([r.public() for r in reqs], indent=2))
            return
        print(f"{'request':18} {'project':16} {'kind':8} {'state':10} {'by':12} {'created (UTC)':17} file")
        for r in reqs:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.created))
            print(f"{r.id:18} {r.project:16} {r.kind:8} {r.state:10} {r.username:12} {when:17} {r.filename}")

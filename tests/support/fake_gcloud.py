"""A stand-in for `gcloud` (tests/test_launch.py puts it on PATH as `gcloud`): it records every
command it receives and answers from a small simulated world kept in $FAKE_GCLOUD_DIR/world.json.

world.json keys:
  qr          the queued resource's state (MISSING: describe fails), e.g. SUSPENDED, ACTIVE
  node        the TPU VM's state (MISSING: describe fails), e.g. READY, PREEMPTED
  after_create  states a created request goes through, one per describe (default ["ACTIVE"]),
                e.g. ["WAITING_FOR_RESOURCES", "ACTIVE"]; its node is READY once it is ACTIVE
  trainer     "running" / "idle": what `pgrep` on worker 0 reports; a start makes it running
  finish_after  export checks a running trainer survives; then it exits, the export written
  export      whether WORKDIR/export exists
  startup     the line worker 0's log shows after a start
  log_error   the error line an exited trainer left in worker 0's log ("": none)
  missing     gs:// paths `storage ls` does not find;  readonly: `storage cp` fails
Every call is appended to calls.jsonl as its argument list. Nothing leaves the machine.
"""
import json
import os
import sys


def main(argv):
  d = os.environ["FAKE_GCLOUD_DIR"]
  with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
  path = os.path.join(d, "world.json")
  with open(path) as f:
    w = json.load(f)
  out, code = "", 0
  args = [a for a in argv if a != "alpha"]
  words = [a for a in args if not a.startswith("-")]
  flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)

  def advance():  # a created request moves on one state per describe
    if w.get("pending"):
      w["qr"] = w["pending"].pop(0)
      if w["qr"] == "ACTIVE":
        w["node"] = "READY"

  if words[:3] == ["compute", "tpus", "queued-resources"]:
    verb = words[3]
    if verb == "describe":
      if w.get("qr", "MISSING") == "MISSING":
        code = 1
      else:
        out = w["qr"]
        advance()
    elif verb == "create":
      if w.get("qr", "MISSING") != "MISSING":
        code, out = 1, "ALREADY_EXISTS"
      else:
        w["qr"], w["node"] = "CREATING", "MISSING"
        w["pending"] = list(w.get("after_create", ["ACTIVE"]))
    elif verb == "delete":
      w["qr"], w["node"], w["trainer"] = "MISSING", "MISSING", "idle"
  elif words[:3] == ["compute", "tpus", "tpu-vm"]:
    verb = words[3]
    if verb == "describe":
      if w.get("node", "MISSING") == "MISSING":
        code = 1
      else:
        out = w["node"]
    elif verb == "create":
      if w.get("node", "MISSING") != "MISSING":
        code, out = 1, "ALREADY_EXISTS"
      else:
        w["node"] = "READY"
    elif verb == "delete":
      w["node"], w["trainer"] = "MISSING", "idle"
    elif verb == "ssh":
      cmd = flags.get("command", "")
      if "pgrep" in cmd:
        out = w.get("trainer", "idle")
      elif "grep -m1" in cmd and "initialised" in cmd:  # train: the start-up line
        out = w.get("startup", "initialised a new run in gs://b/run on mesh {'data': 32}")
      elif "grep -m1" in cmd:  # supervise: an error a finished trainer left in its log
        out = w.get("log_error", "")
      elif "nohup setsid" in cmd:
        w["trainer"] = "running"
        out = "started on t1v-0"
  elif words[:2] == ["storage", "ls"]:
    target = words[2]
    if target.rstrip("/").endswith("/export"):
      if w.get("trainer") == "running" and "finish_after" in w:
        w["finish_after"] -= 1  # a running trainer finishes after this many checks
        if w["finish_after"] < 0:
          w["trainer"], w["export"] = "idle", True
      code = 0 if w.get("export") else 1
    elif target in w.get("missing", []):
      code = 1
  elif words[:2] == ["storage", "cp"]:
    code = 1 if w.get("readonly") else 0
  with open(path, "w") as f:
    json.dump(w, f)
  if out:
    print(out)
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

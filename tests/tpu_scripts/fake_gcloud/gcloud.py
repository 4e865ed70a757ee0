"""A stand-in for gcloud in tests/tpu_scripts: the TPU and storage commands, as gcloud's reference documents them.

It answers from the gcloud reference and the Cloud TPU API's documented states, so the scripts are
tested against those and not against themselves:
- stdout holds only what the command's --format asks for. Everything else goes to stderr, as in
  gcloud: operation progress, "Listed 0 items.", ssh's connection lines, the update notice (unless
  CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK is set) and $FAKE_NOTICE.
- A flag the command does not document fails as "unrecognized arguments" (exit 2); API errors
  (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, no capacity) exit 1; a failed ssh exits 255.
- A queued resource has no TPU node until it is ACTIVE; SUSPENDING shows its node PREEMPTED;
  SUSPENDED, FAILED and DELETING have none.
Each call is appended, shell-quoted, to $FAKE_GCLOUD_LOG; the project lives in a JSON file beside
it. The clock is the sum of the scripts' sleeps (`sleep` beside this file adds to it).

The scenario, from the environment. A life is 'STATE@SECONDS,...' counted from its start; lives are
';'-separated, one per resource created; the last state of a life and the last life repeat.
  FAKE_NODES      TPU node lives, one per node made (tpu-vm create, or a queued resource turning
                  ACTIVE); default READY@0. DELETED@T: the node is gone from T on.
  FAKE_QRS        queued-resource lives; default WAITING_FOR_RESOURCES@0,PROVISIONING@540,ACTIVE@600.
  FAKE_RUNS       the training run's lives, one per launch: RUNNING, DONE, GONE (it died),
                  HUNG (alive, its log silent since); default RUNNING@0,DONE@3600.
  FAKE_UP         node | qr: that resource, set up and running, exists when the scenario starts.
  FAKE_STOCKOUTS  the first N `tpu-vm create` calls find no capacity in the zone.
  FAKE_SSH_FAILS  ssh calls, counted from 1, that fail as an unreachable worker does: '2,3'.
  FAKE_WORKERS    hosts in the slice (default 2).
  FAKE_BUCKETS    buckets that exist (default: b).
"""

from __future__ import annotations

import json
import os
import shlex
import sys

# A sample of zones and the TPU types they offer (the Cloud TPU regions and zones page).
ZONES = {
  "us-west4-a": [f"v5litepod-{n}" for n in (1, 4, 8, 16, 32, 64, 128, 256)],
  "us-east5-a": [f"v5p-{n}" for n in (8, 16, 32, 64, 128)],
  "us-east5-b": [f"v6e-{n}" for n in (1, 4, 8, 16, 32, 64, 128, 256)],
  "us-central2-b": [f"v4-{n}" for n in (8, 16, 32, 64, 128)],
  "europe-west4-a": [f"v5litepod-{n}" for n in (1, 4, 8, 16)] + [f"v6e-{n}" for n in (1, 4, 8)],
}
QR_DEFAULT = "WAITING_FOR_RESOURCES@0,PROVISIONING@540,ACTIVE@600"
UPDATE_NOTICE = (
  "\n\nUpdates are available for some Google Cloud CLI components.  To install them,\n"
  "please run:\n  $ gcloud components update\n\n"
)

GLOBAL_VALUED = {
  "--project", "--format", "--verbosity", "--account", "--billing-project", "--configuration",
  "--flags-file", "--flatten", "--impersonate-service-account", "--trace-token",
}  # fmt: skip
GLOBAL_BOOL = {"--quiet", "-q", "--log-http", "--user-output-enabled", "--no-user-output-enabled"}
LIST_VALUED = {"--zone", "--filter", "--limit", "--page-size", "--sort-by"}
SSH_VALUED = {"--zone", "--worker", "--ssh-flag", "--ssh-key-file", "--strict-host-key-checking",
              "--ssh-key-expiration", "--ssh-key-expire-after"}  # fmt: skip
SSH_BOOL = {"--dry-run", "--force-key-file-overwrite", "--internal-ip", "--plain"}
NODE_SPEC_VALUED = {
  "--zone", "--accelerator-type", "--topology", "--type", "--boot-disk", "--data-disk", "--description",
  "--labels", "--metadata", "--metadata-from-file", "--network", "--range", "--scopes", "--service-account",
  "--subnetwork", "--tags",
}  # fmt: skip
# command -> (flags that take a value, flags that do not); from each command's reference page.
COMMANDS = {
  "compute tpus tpu-vm create": (NODE_SPEC_VALUED | {"--version", "--queue-count"},
    {"--async", "--internal-ips", "--preemptible", "--reserved", "--shielded-secure-boot", "--spot"}),
  "compute tpus tpu-vm delete": ({"--zone"}, {"--async"}),
  "compute tpus tpu-vm list": (LIST_VALUED, {"--uri"}),
  "compute tpus tpu-vm ssh": (SSH_VALUED | {"--command", "--output-directory"}, SSH_BOOL),
  "compute tpus tpu-vm scp": (SSH_VALUED | {"--scp-flag"}, SSH_BOOL | {"--recurse", "--compress"}),
  "compute tpus tpu-vm accelerator-types list": (LIST_VALUED, {"--uri"}),
  "compute tpus queued-resources create": (NODE_SPEC_VALUED | {
      "--runtime-version", "--node-id", "--node-count", "--node-prefix", "--valid-after-duration",
      "--valid-after-time", "--valid-until-duration", "--valid-until-time", "--reservation-host-folder",
      "--reservation-host-organization", "--reservation-host-project"},
    {"--async", "--guaranteed", "--internal-ips", "--reserved", "--shielded-secure-boot", "--spot"}),
  "compute tpus queued-resources delete": ({"--zone"}, {"--async", "--force"}),
  "compute tpus queued-resources list": (LIST_VALUED, {"--uri"}),
  "storage buckets describe": (set(), {"--raw"}),
  "storage rsync": ({"--exclude"}, {"--recursive", "-r", "--delete-unmatched-destination-objects", "--dry-run"}),
}  # fmt: skip


class Failure(Exception):
  """gcloud's error: the message (stderr) and the exit status."""

  def __init__(self, message: str, status: int = 1):
    super().__init__(message)
    self.status = status


def parse(argv: list[str]) -> tuple[str, list[str], dict[str, str | bool], list[str]]:
  """gcloud's argument parsing: (command, positionals, flags, args after --)."""
  words, rest = [], argv
  while rest and not rest[0].startswith("-") and " ".join(words + [rest[0]]) in _prefixes():
    words, rest = words + [rest[0]], rest[1:]
  command = " ".join(words)
  if command not in COMMANDS:
    raise Failure(f"fake gcloud: not emulated: gcloud {' '.join(argv)}", 3)
  valued, boolean = COMMANDS[command]
  valued, boolean = valued | GLOBAL_VALUED, boolean | GLOBAL_BOOL
  positionals, flags, extra, unknown = [], {}, [], []
  while rest:
    arg, rest = rest[0], rest[1:]
    if arg == "--":
      extra, rest = rest, []
    elif arg.startswith("-"):
      name, has_value, value = arg.partition("=")
      if name in valued:
        if not has_value:
          if not rest:
            raise Failure(f"ERROR: (gcloud.{command.replace(' ', '.')}) argument {name}: expected one argument", 2)
          value, rest = rest[0], rest[1:]
        flags[name] = value
      elif name in boolean and not has_value:
        flags[name] = True
      else:
        unknown.append(arg)
    else:
      positionals.append(arg)
  if unknown:
    raise Failure(f"ERROR: (gcloud.{command.replace(' ', '.')}) unrecognized arguments: {' '.join(unknown)}", 2)
  return command, positionals, flags, extra


def _prefixes() -> set[str]:
  out = set()
  for command in COMMANDS:
    words = command.split()
    out.update(" ".join(words[: i + 1]) for i in range(len(words)))
  return out


def lives(name: str, default: str) -> list[list[tuple[str, int]]]:
  out = []
  for life in os.environ.get(name, default).split(";"):
    entries = [item.split("@") for item in life.split(",")]
    out.append([(state, int(at)) for state, at in entries])
  return out


def life_of(name: str, default: str, index: int) -> list[tuple[str, int]]:
  every = lives(name, default)
  return every[min(index, len(every) - 1)]


def state_at(life: list[tuple[str, int]], age: int) -> tuple[str, int]:
  """The state a life shows at `age`, and when it began."""
  current = life[0]
  for state, at in life:
    if at <= age:
      current = (state, at)
  return current


class Project:
  """The resources of one project, saved between calls; `now` is the scenario's clock."""

  def __init__(self, log: str):
    self.path = log + ".project.json"
    self.now = int(open(log + ".clock").read()) if os.path.exists(log + ".clock") else 0
    if os.path.exists(self.path):
      self.data = json.load(open(self.path))
    else:
      self.data = {"nodes": {}, "qrs": {}, "lives": {"node": 0, "qr": 0, "run": 0}, "ssh": 0, "creates": 0}
      self._start(os.environ.get("FAKE_UP", ""))
    self.refresh()

  def save(self) -> None:
    with open(self.path, "w") as f:
      json.dump(self.data, f)

  def _start(self, up: str) -> None:
    zone, kind = "us-west4-a", "v5litepod-8"
    if up == "node":
      node = self.new_node("tune", zone, kind, None, 0)
    elif up == "qr":
      self.new_qr("tune", "tune", zone, kind)
      self.refresh()
      node = self.data["nodes"].get("tune")
    else:
      return
    node.update(installed=True, configured=True)
    self.new_run(node)

  def new_node(self, name: str, zone: str, kind: str, qr: str | None, born: int) -> dict:
    life = self.data["lives"]["node"]
    self.data["lives"]["node"] += 1
    node = dict(zone=zone, type=kind, qr=qr, life=life, born=born, installed=False, configured=False, run=None)
    self.data["nodes"][name] = node
    return node

  def new_qr(self, name: str, node_id: str, zone: str, kind: str) -> None:
    life = self.data["lives"]["qr"]
    self.data["lives"]["qr"] += 1
    self.data["qrs"][name] = dict(zone=zone, type=kind, node_id=node_id, life=life, born=self.now, made_node=False)

  def new_run(self, node: dict) -> None:
    node["run"] = dict(life=self.data["lives"]["run"], born=self.now)
    self.data["lives"]["run"] += 1

  def qr_state(self, qr: dict) -> str:
    return state_at(life_of("FAKE_QRS", QR_DEFAULT, qr["life"]), self.now - qr["born"])[0]

  def node_state(self, node: dict) -> str:
    if node["qr"] and self.qr_state(self.data["qrs"][node["qr"]]) == "SUSPENDING":
      return "PREEMPTED"
    return state_at(life_of("FAKE_NODES", "READY@0", node["life"]), self.now - node["born"])[0]

  def refresh(self) -> None:
    """Queued resources make and remove their nodes; nodes whose life says so disappear."""
    for name, qr in self.data["qrs"].items():
      state, node = self.qr_state(qr), self.data["nodes"].get(qr["node_id"])
      if state in ("ACTIVE", "SUSPENDING") and not qr["made_node"]:
        life = life_of("FAKE_QRS", QR_DEFAULT, qr["life"])
        active = qr["born"] + next(at for s, at in life if s == "ACTIVE")
        self.new_node(qr["node_id"], qr["zone"], qr["type"], name, active)
        qr["made_node"] = True
      elif state not in ("ACTIVE", "SUSPENDING") and node is not None and node["qr"] == name:
        del self.data["nodes"][qr["node_id"]]
    for name in [n for n, node in self.data["nodes"].items() if self.node_state(node) == "DELETED"]:
      del self.data["nodes"][name]

  def run_status(self, node: dict) -> str:
    """What the run check prints for each worker."""
    if not (node["installed"] and node["configured"]):
      return "JT_STATUS=NEW"
    if node["run"] is None:
      return "JT_STATUS=GONE"
    state, since = state_at(
      life_of("FAKE_RUNS", "RUNNING@0,DONE@3600", node["run"]["life"]), self.now - node["run"]["born"]
    )
    if state == "HUNG":
      return f"JT_STATUS=RUNNING JT_IDLE={self.now - node['run']['born'] - since}"
    if state == "RUNNING":
      return "JT_STATUS=RUNNING JT_IDLE=0"
    return f"JT_STATUS={state}"


def zone_of(command: str, flags: dict) -> str:
  zone = flags.get("--zone")
  if not zone:
    raise Failure(f"ERROR: (gcloud.{command.replace(' ', '.')}) Error parsing [zone]: set --zone or compute/zone")
  if zone not in ZONES:
    raise Failure(
      f"ERROR: (gcloud.{command.replace(' ', '.')}) NOT_FOUND: Location {zone} is not found or access is unauthorized."
    )
  return zone


def formatted(rows: list[dict], fmt: str) -> str:
  """--format=value(FIELD,...): tab-separated fields, one line per resource (the only format the fake speaks)."""
  if not (fmt.startswith("value(") and fmt.endswith(")")):
    raise Failure(f"fake gcloud: --format={fmt} is not emulated", 3)
  lines = []
  for row in rows:
    fields = []
    for key in fmt[len("value(") : -1].split(","):
      basename = key.endswith(".basename()")
      value = row
      for part in key.removesuffix(".basename()").split("."):
        value = value.get(part, "") if isinstance(value, dict) else ""
      fields.append(value.rsplit("/", 1)[-1] if basename else str(value))
    lines.append("\t".join(fields))
  return "".join(line + "\n" for line in lines)


def operation(verb: str, kind: str, name: str, zone: str) -> None:
  print(f"{verb.capitalize()} request issued for: [{name}]", file=sys.stderr)
  print(
    f"Waiting for operation [projects/proj/locations/{zone}/operations/operation-1] to complete...done.",
    file=sys.stderr,
  )
  print(f"{verb.capitalize()}d {kind} [{name}].", file=sys.stderr)


def run(argv: list[str], project: Project) -> str:
  command, pos, flags, extra = parse(argv)
  err = f"ERROR: (gcloud.{command.replace(' ', '.')})"
  nodes, qrs, now = project.data["nodes"], project.data["qrs"], project.now
  fmt = flags.get("--format", "")

  if command == "compute tpus tpu-vm accelerator-types list":
    return formatted([{"name": f"acceleratorTypes/{t}", "type": t} for t in ZONES[zone_of(command, flags)]], fmt)

  if command in ("compute tpus tpu-vm list", "compute tpus queued-resources list"):
    if "--filter" in flags:
      raise Failure("fake gcloud: --filter is not emulated", 3)
    zone = zone_of(command, flags)
    if command.endswith("tpu-vm list"):
      rows = [
        {
          "name": f"projects/proj/locations/{zone}/nodes/{n}",
          "state": project.node_state(v),
          "acceleratorType": v["type"],
        }
        for n, v in nodes.items()
        if v["zone"] == zone
      ]
    else:
      rows = [
        {"name": f"projects/proj/locations/{zone}/queuedResources/{n}", "state": {"state": project.qr_state(v)}}
        for n, v in qrs.items()
        if v["zone"] == zone
      ]
    if not rows:
      print("Listed 0 items.", file=sys.stderr)
    return formatted(rows, fmt)

  if command == "compute tpus tpu-vm create":
    (name,) = pos
    zone, kind = zone_of(command, flags), flags.get("--accelerator-type", "v2-8")
    if "--version" not in flags:
      raise Failure(f"{err} argument --version: Must be specified.", 2)
    if kind not in ZONES[zone]:
      raise Failure(f"{err} INVALID_ARGUMENT: Accelerator type {kind} is not available in zone {zone}.")
    if name in nodes:
      raise Failure(f"{err} ALREADY_EXISTS: Resource 'projects/proj/locations/{zone}/nodes/{name}' already exists")
    project.data["creates"] += 1
    if project.data["creates"] <= int(os.environ.get("FAKE_STOCKOUTS", "0")):
      raise Failure(
        f'{err} {{"code": 8, "message": "There is no more capacity in the zone \\"{zone}\\"; you can try in another '
        'zone where Cloud TPU Nodes are offered (see https://cloud.google.com/tpu/docs/regions) [EID: 0x1f]"}'
      )
    project.new_node(name, zone, kind, None, now)
    operation("create", "tpu", name, zone)
    return ""

  if command == "compute tpus queued-resources create":
    (name,) = pos
    zone, kind = zone_of(command, flags), flags.get("--accelerator-type", "")
    for required in ("--runtime-version", "--node-id"):
      if required not in flags:
        raise Failure(f"{err} argument {required}: Must be specified.", 2)
    if kind not in ZONES[zone]:
      raise Failure(f"{err} INVALID_ARGUMENT: Accelerator type {kind} is not available in zone {zone}.")
    if name in qrs:
      raise Failure(
        f"{err} ALREADY_EXISTS: Resource 'projects/proj/locations/{zone}/queuedResources/{name}' already exists"
      )
    project.new_qr(name, flags["--node-id"], zone, kind)
    operation("create", "queued resource", name, zone)
    return ""

  if command == "compute tpus tpu-vm delete":
    (name,) = pos
    zone = zone_of(command, flags)
    if name not in nodes:
      raise Failure(f"{err} NOT_FOUND: Resource 'projects/proj/locations/{zone}/nodes/{name}' was not found")
    del nodes[name]
    operation("delete", "tpu", name, zone)
    return ""

  if command == "compute tpus queued-resources delete":
    (name,) = pos
    zone = zone_of(command, flags)
    if name not in qrs:
      raise Failure(f"{err} NOT_FOUND: Resource 'projects/proj/locations/{zone}/queuedResources/{name}' was not found")
    node_id = qrs[name]["node_id"]
    if node_id in nodes and "--force" not in flags:
      raise Failure(
        f"{err} FAILED_PRECONDITION: the queued resource still has node {node_id}; delete it first or use --force"
      )
    nodes.pop(node_id, None)
    del qrs[name]
    operation("delete", "queued resource", name, zone)
    return ""

  if command in ("compute tpus tpu-vm ssh", "compute tpus tpu-vm scp"):
    if command.endswith("ssh"):
      (target,) = pos
    else:
      target = next((p.split(":", 1)[0] for p in pos if ":" in p), "")
    name = target.rsplit("@", 1)[-1]
    zone = zone_of(command, flags)
    if name not in nodes:
      raise Failure(f"{err} NOT_FOUND: Resource 'projects/proj/locations/{zone}/nodes/{name}' was not found")
    node, workers = nodes[name], int(os.environ.get("FAKE_WORKERS", "2"))
    worker = flags.get("--worker", "0")
    if worker != "all" and not (worker.isdigit() and int(worker) < workers):
      raise Failure(f"{err} Invalid worker [{worker}]: the TPU has workers 0 to {workers - 1}.")
    selected = range(workers) if worker == "all" else [int(worker)]
    if worker == "all":
      print(
        f"Using ssh batch size of 1. Attempting to SSH into 1 nodes with a total of {workers} workers.", file=sys.stderr
      )
    for w in selected:
      print(f"SSH: Attempting to connect to worker {w}...", file=sys.stderr)
    if command.endswith("ssh"):
      project.data["ssh"] += 1
      fails = {int(n) for n in os.environ.get("FAKE_SSH_FAILS", "").split(",") if n}
      if project.data["ssh"] in fails or project.node_state(node) != "READY":
        raise Failure(
          "ssh: connect to host 10.130.0.7 port 22: Connection timed out\n"
          f"{err} [/usr/bin/ssh] exited with return code [255].",
          255,
        )
      remote = flags.get("--command", "")
      if "JT_STATUS" in remote:
        return "".join(project.run_status(node) + "\n" for _ in selected)
      if "pip install" in remote:
        node["installed"] = True
      elif "jaxtune.train" in remote:
        project.new_run(node)
      return ""
    if project.node_state(node) != "READY":
      raise Failure(f"{err} [/usr/bin/scp] exited with return code [1].")
    if any(p.startswith(f"{target}:") and "/configs/" in p for p in pos[1:]):
      node["configured"] = True
    return ""

  if command == "storage buckets describe":
    (url,) = pos
    bucket = url.removeprefix("gs://").rstrip("/")
    if bucket not in os.environ.get("FAKE_BUCKETS", "b").split(","):
      raise Failure(f"{err} {url} not found: 404.")
    return formatted([{"name": bucket}], fmt) if fmt else f"name: {bucket}\n"

  if command == "storage rsync":
    return ""
  raise Failure(f"fake gcloud: not emulated: gcloud {' '.join(argv)}", 3)


def main() -> int:
  log = os.environ["FAKE_GCLOUD_LOG"]
  with open(log, "a") as f:
    f.write(shlex.join(["gcloud", *sys.argv[1:]]) + "\n")
  project = Project(log)
  if os.environ.get("FAKE_NOTICE"):
    print(os.environ["FAKE_NOTICE"], file=sys.stderr)
  try:
    out = run(sys.argv[1:], project)
    status = 0
  except Failure as failure:
    print(str(failure), file=sys.stderr)
    out, status = "", failure.status
  project.refresh()
  project.save()
  sys.stdout.write(out)
  if not os.environ.get("CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK"):
    sys.stderr.write(UPDATE_NOTICE)
  return status


if __name__ == "__main__":
  sys.exit(main())

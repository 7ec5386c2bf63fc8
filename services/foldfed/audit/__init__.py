"""The audit trail: signed contributions (manifests), signed step records, and the offline
check of a whole cycle (`foldfed verify STATE_DIR --keyring K`, docs/threat-model.md).

- `signatures`: what a member's manifest signature and the hub's record signature cover;
- `record`: what a step record holds, and its JSON form;
- `chain`: how a cycle's records, manifests and files are checked against each other
  (pure: facts in, the first break out).

All pure. The shell that reads a hub's state folder, recomputes what retention kept and
reports is `foldfed.verifier` (it uses the aggregator's code, which uses this package).
"""

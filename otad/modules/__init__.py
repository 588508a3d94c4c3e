"""Update modules: installing payloads other than root filesystem images.

otad speaks the Mender Update Module v3 protocol, so the community's module executables
run unchanged. `runner.ModuleRunner` is what the update engine drives, one per payload;
`tree` lays out the file tree a module sees, `streams` feeds the Download state,
`process` starts and stops module executables, `protocol` names the states and parses
the answers of the query states, and `locate` finds the executable for a payload type.
The modules otad ships are executables under `bin/`.
"""

"""The daemon's D-Bus API, org.otad.Updater1, and a client for it (otactl's).

All dbus-next code lives in this package: `interface` declares the exported members (in
dbus-next's signature-string annotations), `service` implements them on top of
otad.updater, `authorize` decides who may change the device, `errors` names the errors
a client gets, `client` is the caller's side. The hand-written introspection data is
systemd/dbus/org.otad.Updater1.xml; a test compares it with what the daemon exports.
"""

from __future__ import annotations

BUS_NAME = "org.otad.Updater1"
OBJECT_PATH = "/org/otad/Updater1"
INTERFACE = "org.otad.Updater1"

"""The device side of the Mender server API: otad managed from a Mender server.

A device converted by otad authenticates to an existing Mender server (hosted or
self-hosted), polls it for deployments, installs them with the update engine, reports
every step of a deployment and keeps the server's inventory of the device current.
Modules: `config` (the [server] table), `client` (HTTP and the errors of the server),
`auth` (the device key and authentication), `deployments`, `inventory`, `device` (what
is read of the engine), `pending` (the deployment in progress, kept across reboots),
`poller` (the loop that ties them together; its docstring maps every answer of the
server to what otad does) and `service` (the poller in the daemon, on its own thread,
installing through the Updater).
"""

"""The admin API: forced breakers and config reloads, shared by every process and task.

`token` checks the operator's token; `shared` keeps what every process must agree on in Redis;
`sync` applies it in each process; `reload` decides whether a new file may replace the running
one; `api` answers `/admin/...` on the admin port and logs who did what and why; `client` is
what `payagg admin` sends.

May import: `proxy.providers`, `proxy.store`, `proxy.settings`, `proxy.observability`,
`proxy.errors`. `proxy.server` wires it into the process and serves it on `server.admin_port`.
"""

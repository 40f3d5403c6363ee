"""What a provider is and how payagg calls one.

`mapping` is the mapping language (request templates, answer rules), `classification` what the
end of a call means (outcome, breaker vote, whether it may be sent again), `access_tokens` and
`callbacks` the `auth:` and `callback:` parts of a provider's description, `breaker` the
per-provider circuit breaker, `upstream` the HTTP client that makes one provider call.

May import: `proxy.store`, `proxy.settings`, `proxy.observability`, `proxy.errors`, and the
`Payment` value from `proxy.payments.request`. `mapping` (with the `classification` it reads),
`access_tokens` and `callbacks` are compiled by `proxy.settings.config`, so they import nothing
above `proxy.settings.yaml_source`.
Never `proxy.server` or `proxy.devtools` (`make lint` checks it).
"""

"""Redis: key layout, Lua scripts and the payment records of the lifecycle."""

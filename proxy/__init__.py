"""payagg: a resilient payment gateway aggregator."""

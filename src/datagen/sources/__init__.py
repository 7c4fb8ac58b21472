"""Where rows come from: market data, grounded market QA, source QA files, the fetch stage."""

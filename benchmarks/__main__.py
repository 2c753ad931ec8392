"""``python -m benchmarks`` (``make bench``): runs every benchmark with its defaults."""

from benchmarks import callback_overhead, eigensolvers, hvp_cost

if __name__ == "__main__":
    hvp_cost.main([])
    eigensolvers.main()
    callback_overhead.main([])

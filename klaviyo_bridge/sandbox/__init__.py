"""Simulated Whiplash and Klaviyo servers (aiohttp.web) for tests, the demo and manual exploration."""

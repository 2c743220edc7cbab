"""klaviyo-bridge: Whiplash order statuses into each merchant's own Klaviyo account."""

__version__ = "0.1.0"

"""Server-sent events: one database watcher per API process feeds every
open stream (``watcher.py``); what a stream sends, and when it ends
(``feeds.py``)."""

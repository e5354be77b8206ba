"""Worker processes: the front process, the media workers and the channel between them."""

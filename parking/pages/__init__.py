"""Pages for people, served by the app itself: the held driver's pay page (`/pay/{id}`, what
a held gate's QR code opens) and the driver's app (`/app`). Server-rendered Jinja2 templates
with a little vanilla JS and one stylesheet, all shipped in the package (no CDN, no build
step); Chinese first, English with `?lang=en`."""

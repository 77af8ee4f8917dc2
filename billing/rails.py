"""What the rest of the system knows of the real payment rails without importing their
clients (settings are read by every process; the WeChat Pay client is heavy)."""

# WeChat Pay API v3's own hosts (main and backup domain); any other base URL is an emulator.
WECHAT_API = "https://api.mch.weixin.qq.com"
WECHAT_HOSTS = (WECHAT_API, "https://api2.mch.weixin.qq.com")

# The mini program's sign-in (wx.login's code exchanged for the driver's openid): WeChat's own
# API host, not the payment one.
WECHAT_LOGIN_API = "https://api.weixin.qq.com"

"""Every text of the pages, Chinese first. The scripts get the same table (as JSON in the
page), so a page and its script never disagree."""

TEXTS: dict[str, dict[str, str]] = {
    "switch": {"zh": "English", "en": "中文"},
    "switch_label": {"zh": "Switch to English", "en": "切换到中文"},
    # The pay page (a held gate's QR code).
    "pay_title": {"zh": "出场缴费", "en": "Pay to leave"},
    "car_park": {"zh": "停车场", "en": "Car park"},
    "plate": {"zh": "车牌", "en": "Plate"},
    "entered": {"zh": "入场时间", "en": "Entered"},
    "parked": {"zh": "停车时长", "en": "Parked"},
    "breakdown": {"zh": "费用明细", "en": "Fee breakdown"},
    "period": {"zh": "时段", "en": "Period"},
    "amount": {"zh": "金额", "en": "Amount"},
    "regular": {"zh": "平日", "en": "Weekday"},
    "holiday": {"zh": "节假日", "en": "Holiday"},
    "discount": {"zh": "优惠", "en": "Discount"},
    "stay_fee": {"zh": "本次停车费", "en": "This stay"},
    "debt": {"zh": "历史欠费", "en": "Unpaid earlier fees"},
    "debts_included": {"zh": "含历史欠费", "en": "Earlier unpaid fees included"},
    "total": {"zh": "应付合计", "en": "Total to pay"},
    "pay": {"zh": "支付", "en": "Pay"},
    "pay_link": {"zh": "未跳转？点此打开支付页面", "en": "Not opened? Open the payment page"},
    "state_due": {"zh": "请支付后离场", "en": "Please pay to leave"},
    "state_paying": {
        "zh": "正在等待支付结果…支付完成后道闸自动抬起",
        "en": "Waiting for your payment… the barrier opens once it is paid",
    },
    "state_paid": {"zh": "支付成功，道闸正在抬起…", "en": "Paid. The barrier is opening…"},
    "state_open": {"zh": "请通行", "en": "Please drive on"},
    "state_settled": {
        "zh": "此次停车已结清，无需再次支付",
        "en": "This stay is already paid: nothing more to pay",
    },
    "state_expired": {
        "zh": "二维码已过期，请扫描出口显示屏上的新二维码，或联系管理员",
        "en": "This QR code has expired: scan the new one on the exit display, or ask staff",
    },
    "state_no_tariff": {
        "zh": "暂时无法计费，请联系出口管理员",
        "en": "The fee cannot be worked out: please ask the staff at the exit",
    },
    "state_nothing_due": {
        "zh": "无需缴费，道闸将自动抬起",
        "en": "Nothing to pay: the barrier opens by itself",
    },
    "state_unknown": {
        "zh": "二维码无效，请扫描出口显示屏上的二维码",
        "en": "This QR code is not valid: scan the one on the exit display",
    },
    "error_provider": {
        "zh": "支付服务暂时不可用，请稍后再试",
        "en": "The payment service is unavailable: try again in a moment",
    },
    "error_network": {"zh": "网络异常，请重试", "en": "Network problem: please try again"},
}

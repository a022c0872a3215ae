#include "message_banner.h"

#include <QHBoxLayout>
#include <QLabel>
#include <QPainter>
#include <QStyle>
#include <QToolButton>

namespace modscope {

MessageBanner::MessageBanner(QWidget* parent) : QWidget(parent) {
    auto* row = new QHBoxLayout(this);
    row->setContentsMargins(10, 6, 6, 6);
    icon_ = new QLabel(this);
    label_ = new QLabel(this);
    label_->setWordWrap(true);
    label_->setTextInteractionFlags(Qt::TextSelectableByMouse);
    close_ = new QToolButton(this);
    close_->setAutoRaise(true);
    close_->setIcon(style()->standardIcon(QStyle::SP_TitleBarCloseButton));
    close_->setToolTip(tr("Dismiss"));
    row->addWidget(icon_);
    row->addWidget(label_, 1);
    row->addWidget(close_);
    connect(close_, &QToolButton::clicked, this, &MessageBanner::dismiss);
    setVisible(false);
}

void MessageBanner::showMessage(Kind kind, const QString& text) {
    kind_ = kind;
    label_->setText(text);
    const auto icon = kind == Kind::Error     ? QStyle::SP_MessageBoxCritical
                      : kind == Kind::Warning ? QStyle::SP_MessageBoxWarning
                                              : QStyle::SP_MessageBoxInformation;
    const int size = fontMetrics().height() + 4;
    icon_->setPixmap(style()->standardIcon(icon).pixmap(size, size));
    setVisible(true);
    update();
}

void MessageBanner::dismiss() {
    if (!isVisible()) return;
    setVisible(false);
    Q_EMIT dismissed();
}

QString MessageBanner::text() const { return isVisible() ? label_->text() : QString(); }

void MessageBanner::paintEvent(QPaintEvent*) {
    QPainter p(this);
    const bool dark = palette().color(QPalette::Window).lightness() < 128;
    QColor bg = kind_ == Kind::Error     ? (dark ? QColor(96, 32, 36) : QColor(253, 228, 228))
                : kind_ == Kind::Warning ? (dark ? QColor(92, 72, 24) : QColor(255, 243, 214))
                                         : (dark ? QColor(30, 60, 92) : QColor(224, 238, 252));
    QColor edge = kind_ == Kind::Error     ? QColor(200, 50, 60)
                  : kind_ == Kind::Warning ? QColor(210, 150, 20)
                                           : QColor(40, 120, 200);
    p.fillRect(rect(), bg);
    p.fillRect(QRect(0, 0, 4, height()), edge);
}

}  // namespace modscope

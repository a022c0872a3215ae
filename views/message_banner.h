// MessageBanner: a dismissable strip above the views for errors and notices. It never blocks: a failed
// load or export is reported here while the app keeps running on its previous state.
#pragma once

#include <QWidget>

class QLabel;
class QToolButton;

namespace modscope {

class MessageBanner : public QWidget {
    Q_OBJECT
public:
    enum class Kind { Info, Warning, Error };
    explicit MessageBanner(QWidget* parent = nullptr);

    void showMessage(Kind kind, const QString& text);
    void dismiss();
    Kind kind() const { return kind_; }
    QString text() const;

Q_SIGNALS:
    void dismissed();

protected:
    void paintEvent(QPaintEvent* event) override;

private:
    QLabel* icon_;
    QLabel* label_;
    QToolButton* close_;
    Kind kind_ = Kind::Info;
};

}  // namespace modscope

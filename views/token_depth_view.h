// TokenDepthView: the prompt as running text, each token on a chip coloured by how many layers processed
// it. Where the heatmap answers "what did layer 3 do", this answers "how much compute did this word get".
//
// Chips are laid out once per run or resize and painted only where visible, so a 2,048-token prompt
// scrolls as smoothly as a short one.
#pragma once

#include <QAbstractScrollArea>
#include <QVector>

#include "plot_theme.h"
#include "routing_snapshot.h"

namespace modscope {

class TokenDepthView : public QAbstractScrollArea {
    Q_OBJECT
public:
    explicit TokenDepthView(QWidget* parent = nullptr);

    void setSnapshot(SnapshotPtr snapshot);
    void setTheme(const PlotTheme& theme);
    void selectToken(int token);  // -1 clears
    int selectedToken() const { return selected_; }

    // Content coordinates of a token's chip (for tests and scrolling).
    QRect chipRect(int token) const;
    int tokenAt(const QPoint& viewport_pos) const;
    // The whole content, as an exported figure shows it.
    // The view as a figure: the chips without the hover and selection marks.
    void renderContent(QPainter* painter, const QSize& size);
    QSize contentSize() const { return QSize(viewport()->width(), content_height_); }

Q_SIGNALS:
    void tokenSelected(int token);
    void tokenHovered(int token);

protected:
    void paintEvent(QPaintEvent* event) override;
    void resizeEvent(QResizeEvent* event) override;
    void mouseMoveEvent(QMouseEvent* event) override;
    void mousePressEvent(QMouseEvent* event) override;
    void leaveEvent(QEvent* event) override;
    bool viewportEvent(QEvent* event) override;
    void changeEvent(QEvent* event) override;

private:
    void relayout();
    void paintContent(QPainter& p, const QRect& visible, int width);
    QString chipText(int token) const;
    QColor chipColor(int token) const;
    QString tooltip(int token) const;

    SnapshotPtr snapshot_;
    PlotTheme theme_;
    QVector<QRect> chips_;   // content coordinates
    QVector<QString> labels_;
    int legend_height_ = 0;
    int content_height_ = 0;
    int selected_ = -1;
    int hovered_ = -1;
    int min_depth_ = 0, max_depth_ = 0;
};

}  // namespace modscope

// ShortcutSheet: every keyboard shortcut of the main window, read from its actions so the sheet cannot
// fall out of date.
#pragma once

#include <QDialog>
#include <QList>

class QAction;

namespace modscope {

class ShortcutSheet : public QDialog {
    Q_OBJECT
public:
    // extra: shortcuts that are not actions (keys inside the heatmap), as (keys, description).
    ShortcutSheet(const QList<QAction*>& actions, const QList<QPair<QString, QString>>& extra, QWidget* parent);
};

}  // namespace modscope
